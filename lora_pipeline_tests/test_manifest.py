"""manifest.jsonl / snapshot.json: atomic writes, reading, and re-verifying a snapshot against its manifest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_pipeline.core.datasets.snapshot.manifest import read_manifest, verify_snapshot, write_manifest
from lora_pipeline.core.datasets.snapshot.snapshot import build_snapshot
from lora_pipeline.core.datasets.spec import DatasetSpec, SourceRef
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_text, read_json, write_json
from lora_pipeline.core.hashing import merkle_root
from lora_pipeline.core.paths import DataRoot

FOLDER = "img/10_hdaesth"


@pytest.fixture
def snapshot(tmp_path: Path, make_batch, image_bytes) -> Path:
    root = DataRoot(tmp_path / "data")
    make_batch(root, "b1", {f"{i}.png": image_bytes(i) for i in range(3)})
    spec = DatasetSpec(name="hw-v1", trigger="hdaesth", repeats=10, sources=(SourceRef(batch="b1"),))
    return build_snapshot(root, spec, "c").dir


def test_untouched_snapshot_verifies(snapshot: Path) -> None:
    result = verify_snapshot(snapshot)
    assert result.ok and result.files_checked == 3 and result.problems() == []


def test_flipped_byte_is_caught(snapshot: Path) -> None:
    path = snapshot / FOLDER / "1.png"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    result = verify_snapshot(snapshot)
    assert not result.ok and result.mismatched == [f"{FOLDER}/1.png"]
    assert result.problems() == [f"hw-v1/{FOLDER}/1.png: content changed (sha256 differs from manifest)"]


def test_deleted_and_added_files_are_caught(snapshot: Path) -> None:
    (snapshot / FOLDER / "0.png").unlink()
    (snapshot / FOLDER / "extra.png").write_bytes(b"stowaway")
    result = verify_snapshot(snapshot)
    assert result.missing == [f"{FOLDER}/0.png"] and result.extra == [f"{FOLDER}/extra.png"]
    assert not result.mismatched and not result.ok


def test_symlink_in_place_of_a_file_counts_as_missing(snapshot: Path) -> None:
    path = snapshot / FOLDER / "2.png"
    target = snapshot.parent / "elsewhere.png"
    target.write_bytes(path.read_bytes())
    path.unlink()
    os.symlink(target, path)
    assert verify_snapshot(snapshot).missing == [f"{FOLDER}/2.png"]


def test_edited_manifest_no_longer_matches_the_root(snapshot: Path) -> None:
    manifest = snapshot / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[1:]))  # drop a row: the root changes and the file becomes "extra"
    result = verify_snapshot(snapshot)
    assert result.root_mismatch and len(result.extra) == 1 and not result.ok


def test_write_manifest_sorts_rows_and_returns_their_root(tmp_path: Path) -> None:
    rows = [{"path": p, "kind": "image", "sha256": p * 2, "bytes": len(p)} for p in ("b", "a", "c")]
    root = write_manifest(tmp_path, rows)
    assert root == merkle_root(rows)
    assert [r.path for r in read_manifest(tmp_path)] == ["a", "b", "c"]


def test_atomic_writes_leave_no_temp_files_and_can_be_read_only(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.json"
    write_json(target, {"b": 1, "a": [1]})
    assert read_json(target) == {"a": [1], "b": 1}
    atomic_write_text(target, "again\n", readonly=True)
    assert target.read_text() == "again\n" and (target.stat().st_mode & 0o777) == 0o444
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]


def test_reading_broken_files_names_them(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.jsonl").write_text('{"path": "a"}\nnot json\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match=r"bad.json: invalid JSON"):
        read_json(tmp_path / "bad.json")
