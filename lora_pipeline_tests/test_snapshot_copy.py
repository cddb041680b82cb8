"""Snapshot copies under hashes on record: the same snapshot as hashing every byte, and never a stale hash."""

from __future__ import annotations

import io
import os
import stat
import time
from pathlib import Path

import pytest
from PIL import Image

from lora_pipeline.core.datasets.snapshot.manifest import verify_snapshot
from lora_pipeline.core.datasets.snapshot.snapshot import build_snapshot
from lora_pipeline.core.datasets.sources import hashcache
from lora_pipeline.core.datasets.sources.batches import batch_manifest, scan_batch
from lora_pipeline.core.datasets.sources.hashcache import cache_file, load_cache
from lora_pipeline.core.datasets.spec import DatasetSpec, SourceRef
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_file
from lora_pipeline.core.paths import DataRoot
from lora_pipeline_tests.helpers import finish_version, tree_state

FOLDER = "img/10_hdaesth"
IMAGES = {"a.png": ((40, 30), "PNG"), "b.jpg": ((20, 50), "JPEG"), "views/c.png": ((33, 17), "PNG")}


def spec_for(name: str, *sources: SourceRef) -> DatasetSpec:
    return DatasetSpec(name=name, trigger="hdaesth", repeats=10, sources=sources)


def write_batch(top: Path) -> None:
    for i, (rel, (size, fmt)) in enumerate(IMAGES.items()):
        buf = io.BytesIO()
        Image.new("RGB", size, (i * 60, 90, 200 - i * 50)).save(buf, fmt)
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_bytes(buf.getvalue())
    (top / "views/c.txt").write_text("hdaesth, side view")
    (top / "_READY").write_text("")


def change_in_place(path: Path, forge_mtime: bool) -> None:
    """New content of the same size, written into the same inode; optionally with the old mtime forged back."""
    old = path.stat()
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(data)
    if forge_mtime:
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    new = path.stat()
    assert (new.st_size, new.st_ino) == (old.st_size, old.st_ino) and new.st_ctime_ns != old.st_ctime_ns
    assert (new.st_mtime_ns == old.st_mtime_ns) is forge_mtime


@pytest.fixture
def no_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files count as settled once hashed, however recently they changed: the tests make files and use their
    hash-cache entries at once instead of waiting out the 2 s racy window."""
    monkeypatch.setattr(hashcache, "RACY_NS", 0)


@pytest.fixture(scope="module")
def aged(tmp_path_factory: pytest.TempPathFactory) -> DataRoot:
    """Batches registered (batch_manifest) after they last changed, as a batch that landed before its
    registration is: their hash-cache entries are trusted (registered with no racy window). Each test uses
    its own batch. `hit` is read-only, as sources are."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hashcache, "RACY_NS", 0)
        return _registered_batches(tmp_path_factory)


def _registered_batches(tmp_path_factory: pytest.TempPathFactory) -> DataRoot:
    root = DataRoot(tmp_path_factory.mktemp("aged") / "data")
    for batch in ("hit", "edited", "noop"):
        write_batch(root.batch(batch))
    for path in [root.batch("hit"), *root.batch("hit").rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    for batch in ("hit", "edited", "noop"):
        batch_manifest(scan_batch(root, batch))
    return root


@pytest.fixture
def root(tmp_path: Path) -> DataRoot:
    return DataRoot(tmp_path / "data")


def test_a_warm_build_copies_unread_and_equals_a_cold_build(aged: DataRoot, no_racy_window: None) -> None:
    top = aged.batch("hit")
    before = tree_state(top)
    cached = load_cache(aged, "hit")
    assert sorted(cached) == ["a.png", "b.jpg", "views/c.png", "views/c.txt"]
    assert all(entry.describes(os.lstat(top / rel)) for rel, entry in cached.items())

    warm = build_snapshot(aged, spec_for("hit-warm-v1", SourceRef(batch="hit")), "c")
    cache_file(aged, "hit").unlink()
    cold = build_snapshot(aged, spec_for("hit-cold-v1", SourceRef(batch="hit")), "c")

    assert warm.hashed == 0 and set(warm.copy_methods) <= {"reflink", "copy_file_range", "copy"}
    assert cold.hashed == 3 and sum(cold.copy_methods.values()) == 3
    assert warm.rows == cold.rows and warm.image_root == cold.image_root
    assert [(r.width, r.height) for r in warm.rows] == [size for size, _ in IMAGES.values()]
    assert load_cache(aged, "hit") == {rel: cached[rel] for rel in IMAGES}  # the cold build re-recorded them
    source_inodes = {(top / rel).stat().st_ino for rel in IMAGES}
    for snap in (warm.dir, cold.dir):
        assert verify_snapshot(snap).ok
        for row in warm.rows:
            st = (snap / row.path).lstat()
            assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and stat.S_IMODE(st.st_mode) == 0o444
            assert st.st_ino not in source_inodes
    assert tree_state(top) == before  # nothing under sources/ was written, not even a cache
    assert sorted(p.relative_to(aged.cache).as_posix() for p in aged.cache.rglob("*")) == [
        ".hashcache.key",  # the key of the rows' checks
        "batches",
        "batches/edited.jsonl",
        "batches/hit.jsonl",
        "batches/noop.jsonl",
    ]


def test_a_source_changed_after_hashing_is_hashed_again(aged: DataRoot) -> None:
    top = aged.batch("edited")
    cached = load_cache(aged, "edited")
    change_in_place(top / "a.png", forge_mtime=False)
    change_in_place(top / "b.jpg", forge_mtime=True)  # same size, same mtime: only ctime tells

    result = build_snapshot(aged, spec_for("edited-v1", SourceRef(batch="edited")), "c")

    assert result.hashed == 2
    rows = {r.source_path: r for r in result.rows}
    for rel in ("a.png", "b.jpg"):
        assert rows[rel].sha256 == sha256_file(top / rel) != cached[rel].sha256
    assert rows["views/c.png"].sha256 == cached["views/c.png"].sha256
    assert verify_snapshot(result.dir).ok
    # Just changed, so racy: not recorded; their old entries no longer match and are never trusted again.
    assert load_cache(aged, "edited") == cached


def test_a_noop_rebuild_trusts_the_cache_but_sees_a_forged_change(aged: DataRoot) -> None:
    spec = spec_for("noop-v1", SourceRef(batch="noop"))
    assert build_snapshot(aged, spec, "c").hashed == 0
    again = build_snapshot(aged, spec, "c")
    assert not again.created and again.hashed == 0

    change_in_place(aged.batch("noop") / "views/c.png", forge_mtime=True)
    with pytest.raises(UserError, match="already exists with a different spec .*source files changed"):
        build_snapshot(aged, spec, "c")


def test_files_hashed_right_after_they_landed_are_racy_and_hashed_again(root: DataRoot) -> None:
    write_batch(root.batch("b1"))
    batch_manifest(scan_batch(root, "b1"))  # registered the moment it landed

    result = build_snapshot(root, spec_for("hw-v1", SourceRef(batch="b1")), "c")

    assert result.hashed == 3 and load_cache(root, "b1") == {}
    assert verify_snapshot(result.dir).ok


def test_an_earlier_snapshots_rows_are_trusted_until_its_file_changes(root: DataRoot) -> None:
    write_batch(root.batch("b1"))
    v1 = build_snapshot(root, spec_for("hw-v1", SourceRef(batch="b1")), "c")
    time.sleep(0.02)
    finish_version(root, spec_for("hw-v1", SourceRef(batch="b1")))  # captions, report, seal: snapshot.json again

    v2 = build_snapshot(root, spec_for("hw-v2", SourceRef(dataset="hw-v1")), "c")
    os.utime(v1.dir / FOLDER / "a.png")  # touched after snapshot.json: the row is not trusted, the bytes are read
    v3 = build_snapshot(root, spec_for("hw-v3", SourceRef(dataset="hw-v1")), "c")

    assert v2.hashed == 0 and v3.hashed == 1
    keys = ("sha256", "bytes", "width", "height", "origin_sha256")
    assert [[getattr(r, k) for k in keys] for r in v1.rows] == [[getattr(r, k) for k in keys] for r in v2.rows]
    assert v2.rows == v3.rows
    assert verify_snapshot(v2.dir).ok and verify_snapshot(v3.dir).ok
