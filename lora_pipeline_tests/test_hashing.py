"""Content hashing: file digests and the Merkle root that names a manifest."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from lora_pipeline.core.hashing import canonical_json, merkle_root, sha256_bytes, sha256_file, sha256_json

ROWS = [{"path": f"img/10_t/{i:02d}.png", "sha256": sha256_bytes(bytes([i])), "bytes": 100 + i} for i in range(7)]


def test_sha256_file_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    data = random.Random(1).randbytes((1 << 20) * 2 + 123)  # more than two read chunks
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest() == sha256_bytes(data)


def test_merkle_root_is_independent_of_row_order() -> None:
    shuffled = ROWS[:]
    random.Random(7).shuffle(shuffled)
    assert shuffled != ROWS
    assert merkle_root(shuffled) == merkle_root(ROWS) == merkle_root(reversed(ROWS))


def test_merkle_root_changes_with_any_field_and_with_membership() -> None:
    base = merkle_root(ROWS)
    changed = [
        [{**ROWS[0], "sha256": sha256_bytes(b"other")}, *ROWS[1:]],
        [{**ROWS[3], "bytes": ROWS[3]["bytes"] + 1} if r is ROWS[3] else r for r in ROWS],
        [{**ROWS[6], "path": "img/10_t/renamed.png"} if r is ROWS[6] else r for r in ROWS],
        ROWS[:-1],
        [*ROWS, {"path": "img/10_t/new.png", "sha256": sha256_bytes(b"n"), "bytes": 1}],
    ]
    roots = {merkle_root(rows) for rows in changed}
    assert base not in roots
    assert len(roots) == len(changed)


def test_merkle_root_of_empty_and_single_rows() -> None:
    assert merkle_root([]) == hashlib.sha256(b"").hexdigest()
    leaf = hashlib.sha256(f"{ROWS[0]['path']}\0{ROWS[0]['sha256']}\0{ROWS[0]['bytes']}".encode()).hexdigest()
    assert merkle_root(ROWS[:1]) == leaf


def test_sha256_json_ignores_key_order() -> None:
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    assert sha256_json({"b": 1, "a": 2}) == sha256_json({"a": 2, "b": 1}) != sha256_json({"a": 2, "b": 2})
