"""Hash cache: what one hashing pass records, where it lives, and when an entry is too racy to keep.

Trusting entries during a build (which needs files older than the racy window) is tested in
test_snapshot_copy.py.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from lora_pipeline.core.datasets.sources.batches import batch_manifest, scan_batch
from lora_pipeline.core.datasets.sources.copying import stat_key
from lora_pipeline.core.datasets.sources.hashcache import (
    RACY_NS,
    UNKNOWN_SIZE,
    Entry,
    ImageSize,
    cache_file,
    fingerprint,
    image_size,
    load_cache,
    record,
    trustworthy,
)
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_bytes
from lora_pipeline.core.paths import DataRoot
from lora_pipeline_tests.helpers import tree_state


@pytest.fixture
def root(tmp_path: Path) -> DataRoot:
    return DataRoot(tmp_path / "data")


def entry(path: str, seed: int) -> Entry:
    return Entry(path, sha256_bytes(bytes([seed])), 10 + seed, ImageSize(4, 3, 4, 3), (10 + seed, 1, 2, 100 + seed, 7))


def test_the_racy_rule(tmp_path: Path) -> None:
    f = tmp_path / "a"
    f.write_bytes(b"x")
    st = f.stat()
    last_change = max(st.st_mtime_ns, st.st_ctime_ns)
    assert trustworthy(st, st, started_ns=last_change + RACY_NS + 1)
    assert not trustworthy(st, st, started_ns=last_change + RACY_NS)  # changed < 2 s before it was hashed
    assert trustworthy(st, st, started_ns=last_change + 1, racy_ns=0)  # a window a test may narrow
    assert not trustworthy(st, st, started_ns=last_change, racy_ns=0)
    f.write_bytes(b"xy")
    assert not trustworthy(st, f.stat(), started_ns=last_change + 10 * RACY_NS)  # changed while being hashed
    future = last_change + 100 * RACY_NS
    os.utime(f, ns=(future, future))  # an mtime in the future stays racy until that moment has passed
    st = f.stat()
    assert not trustworthy(st, st, started_ns=st.st_ctime_ns + 10 * RACY_NS)


def test_fingerprint_reads_hash_size_dimensions_and_stat(tmp_path: Path, image_bytes) -> None:
    data = image_bytes(1, "JPEG", size=(40, 30))
    img, txt, bad = tmp_path / "a.jpg", tmp_path / "a.txt", tmp_path / "b.png"
    img.write_bytes(data)
    txt.write_text("caption")
    bad.write_bytes(b"not an image at all")

    found, cacheable = fingerprint(img, "views/a.jpg", image=True)

    assert found == Entry("views/a.jpg", sha256_bytes(data), len(data), ImageSize(40, 30, 40, 30), stat_key(img.stat()))
    assert not cacheable  # written a moment ago: racy
    text = fingerprint(txt, "a.txt", image=False)[0]
    assert (text.bytes, text.size) == (7, UNKNOWN_SIZE)
    broken = fingerprint(bad, "b.png", image=True)[0]
    assert broken.size == UNKNOWN_SIZE  # validation decodes it and reports it


def test_batch_manifest_caches_under_the_data_root_and_never_a_racy_entry(
    root: DataRoot, make_batch, image_bytes
) -> None:
    make_batch(root, "b1", {"a.png": image_bytes(1), "notes.txt": "hi"})
    before = tree_state(root.sources)

    rows = batch_manifest(scan_batch(root, "b1"))

    assert [r["path"] for r in rows] == ["a.png", "notes.txt"]
    assert tree_state(root.sources) == before
    assert cache_file(root, "b1") == root.root / ".cache" / "batches" / "b1.jsonl"
    assert cache_file(root, "b1").is_file() and load_cache(root, "b1") == {}  # both files were just written


def test_record_merges_or_replaces_atomically_and_round_trips(root: DataRoot) -> None:
    assert load_cache(root, "b1") == {}
    record(root, "b1", [])
    assert not cache_file(root, "b1").exists()  # nothing to record, nothing written

    record(root, "b1", [entry("a.png", 1), entry("b.png", 2)])
    record(root, "b1", [entry("b.png", 3), entry("c.png", 4)])
    merged = {"a.png": entry("a.png", 1), "b.png": entry("b.png", 3), "c.png": entry("c.png", 4)}
    assert load_cache(root, "b1") == merged

    record(root, "b1", [entry("c.png", 5)], replace=True)
    assert load_cache(root, "b1") == {"c.png": entry("c.png", 5)}
    assert [p.name for p in cache_file(root, "b1").parent.iterdir()] == ["b1.jsonl"]  # no temp file left


def test_a_damaged_cache_is_reported_not_ignored(root: DataRoot) -> None:
    record(root, "b1", [entry("a.png", 1)])
    path = cache_file(root, "b1")
    path.write_text(path.read_text() + '{"path": "b.png", "sha256": "00"}\n')
    with pytest.raises(UserError) as err:
        load_cache(root, "b1")
    assert str(err.value) == f"{path}: hash cache line 2 is damaged; delete the file (it is rebuilt)"


def _exif_jpeg(size: tuple[int, int], orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "JPEG", exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize(("orientation", "seen"), [(1, (80, 60)), (3, (80, 60)), (6, (60, 80)), (8, (60, 80))])
def test_image_size_is_the_size_training_sees_after_exif_orientation(tmp_path: Path, orientation, seen) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(_exif_jpeg((80, 60), orientation))
    assert image_size(path) == ImageSize(*seen, 80, 60)
    with Image.open(path) as im:  # what training's load_rgb does
        assert ImageOps.exif_transpose(im).size == seen


def test_a_cache_row_from_before_oriented_sizes_is_hashed_again(root: DataRoot) -> None:
    record(root, "b1", [entry("a.png", 1), entry("b.png", 2)])
    path = cache_file(root, "b1")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    del rows[0]["stored_width"], rows[0]["stored_height"]  # the format of the previous release
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_cache(root, "b1") == {"b.png": entry("b.png", 2)}
