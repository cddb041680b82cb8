"""Source batches: scanning without following links, skipping junk, hashing, and copy-only intake."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lora_pipeline.core.datasets.sources.batches import (
    batch_fingerprint,
    batch_manifest,
    intake,
    is_image,
    is_junk,
    scan_batch,
)
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import merkle_root, sha256_bytes
from lora_pipeline.core.paths import DataRoot
from lora_pipeline_tests.helpers import tree_state


@pytest.fixture
def root(tmp_path: Path) -> DataRoot:
    return DataRoot(tmp_path / "data")


def messy_handoff(folder: Path, image_bytes, outside: Path) -> None:
    """Two images, a sidecar, OS junk, hidden things and links of both kinds."""
    files = {
        "views/a.png": image_bytes(1),
        "views/a.txt": "hdaesth, front view",
        "b.JPG": image_bytes(2, "JPEG"),
        ".DS_Store": b"junk",
        "views/Thumbs.db": b"junk",
        "desktop.ini": b"junk",
        "._b.JPG": b"appledouble",
        ".cache/c.png": image_bytes(3),
    }
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.png").write_bytes(image_bytes(4))
    os.symlink(outside / "secret.png", folder / "link.png")
    os.symlink(outside, folder / "linked-folder")


def test_is_junk_and_is_image() -> None:
    assert is_junk(".DS_Store") and is_junk("Thumbs.db") and is_junk("desktop.ini") and is_junk(".hidden")
    assert not is_junk("a.png") and not is_junk("_READY")
    assert is_image("x/A.PNG") and is_image("b.jpeg") and is_image("c.TIFF") and not is_image("a.txt")


def test_scan_lists_regular_files_and_reports_junk_and_links(root: DataRoot, image_bytes, tmp_path: Path) -> None:
    top = root.batch("b1")
    messy_handoff(top, image_bytes, tmp_path / "elsewhere")
    (top / "_READY").write_text("")

    scan = scan_batch(root, "b1")

    assert [f.path for f in scan.files] == ["b.JPG", "views/a.png", "views/a.txt"]
    assert all(f.abs == top / f.path and f.bytes == (top / f.path).stat().st_size for f in scan.files)
    reported = {(p["file"], p["code"]) for p in scan.problems}
    assert reported == {
        (".DS_Store", "junk_skipped"),
        ("desktop.ini", "junk_skipped"),
        ("._b.JPG", "junk_skipped"),
        (".cache/", "junk_skipped"),
        ("views/Thumbs.db", "junk_skipped"),
        ("link.png", "symlink_not_followed"),
        ("linked-folder/", "symlink_not_followed"),
    }
    assert {p["severity"] for p in scan.problems} == {"warning"}
    assert {p["scope"] for p in scan.problems} == {"batch:b1"}


def test_scan_refuses_missing_unready_and_badly_named_batches(root: DataRoot, make_batch, image_bytes) -> None:
    with pytest.raises(UserError, match="batch folder not found"):
        scan_batch(root, "nope")
    make_batch(root, "half", {"a.png": image_bytes(1)}, ready=False)
    with pytest.raises(UserError, match="batch is not complete: no _READY marker"):
        scan_batch(root, "half")
    with pytest.raises(UserError, match="batch id"):
        scan_batch(root, "../escape")


def test_batch_manifest_hashes_every_file(root: DataRoot, make_batch, image_bytes) -> None:
    files = {f"img{i}.png": image_bytes(i) for i in range(6)} | {"sub/notes.txt": "hello"}
    make_batch(root, "b1", files)
    rows = batch_manifest(scan_batch(root, "b1"))
    expected = [
        {"path": rel, "sha256": sha256_bytes(d.encode() if isinstance(d, str) else d), "bytes": len(d)}
        for rel, d in sorted(files.items())
    ]
    assert rows == expected
    assert batch_fingerprint(rows) == merkle_root(expected)


def test_intake_copies_skips_junk_and_marks_ready_last(
    root: DataRoot, image_bytes, tmp_path: Path
) -> None:
    src = tmp_path / "handoff"
    messy_handoff(src, image_bytes, tmp_path / "elsewhere")
    before = tree_state(src)

    result = intake(src, root, "b1")

    assert tree_state(src) == before  # the handoff is only read
    top = root.batch("b1")
    assert result.dir == top and result.files == 3
    content = sorted(p.relative_to(top).as_posix() for p in top.rglob("*") if p.is_file())
    assert content == ["_READY", "b.JPG", "views/a.png", "views/a.txt"]
    for rel in ("b.JPG", "views/a.png", "views/a.txt"):
        copied, original = (top / rel).lstat(), (src / rel).lstat()
        assert (top / rel).read_bytes() == (src / rel).read_bytes()
        assert copied.st_nlink == 1 and copied.st_ino != original.st_ino and stat.S_ISREG(copied.st_mode)
        assert stat.S_IMODE(copied.st_mode) == 0o444
        assert (top / "_READY").stat().st_mtime_ns >= copied.st_mtime_ns
    assert {(p["file"], p["code"]) for p in result.skipped} >= {("link.png", "symlink_not_followed")}
    assert result.rows == batch_manifest(scan_batch(root, "b1"))
    assert result.fingerprint == merkle_root(result.rows)
    assert result.bytes == sum(r["bytes"] for r in result.rows)
    assert sum(result.copy_methods.values()) == 3
    assert root.ready_batches() == ["b1"]
    assert not [p for p in root.sources.iterdir() if p.name.startswith(".")]  # no staging left


def test_intake_refuses_an_existing_batch_and_bad_input(root: DataRoot, image_bytes, tmp_path: Path, make_batch):
    top = make_batch(root, "b1", {"a.png": image_bytes(1)})
    src = tmp_path / "handoff"
    src.mkdir()
    (src / "z.png").write_bytes(image_bytes(2))
    with pytest.raises(UserError, match="batch already exists"):
        intake(src, root, "b1")
    assert sorted(p.name for p in top.iterdir()) == ["_READY", "a.png"]
    with pytest.raises(UserError, match="handoff folder not found"):
        intake(tmp_path / "missing", root, "b2")
    with pytest.raises(UserError, match="batch id"):
        intake(src, root, "has space")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no files to copy"):
        intake(tmp_path / "empty", root, "b3")
    assert not root.batch("b2").exists() and not root.batch("b3").exists()


def test_names_that_are_not_utf8_are_skipped_as_problems_at_scan_and_intake(
    root: DataRoot, image_bytes, tmp_path: Path
) -> None:
    src = tmp_path / "handoff"
    src.mkdir()
    (src / "a.png").write_bytes(image_bytes(1))
    bad_file = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes in a file name
    bad_dir = os.fsdecode(b"d\xff")
    (src / bad_file).write_bytes(image_bytes(2))
    (src / bad_dir).mkdir()
    (src / bad_dir / "b.png").write_bytes(image_bytes(3))

    result = intake(src, root, "b1")

    skipped = {(p["file"], p["code"]) for p in result.skipped}
    assert {("caf\\xe9.png", "undecodable_name"), ("d\\xff/", "undecodable_name")} <= skipped
    assert [r["path"] for r in result.rows] == ["a.png"]
    assert root.ready_batches() == ["b1"]  # complete, with _READY: nothing to retry
    assert sorted(p.name for p in root.batch("b1").iterdir()) == ["_READY", "a.png"]

    (root.batch("b1") / bad_file).write_bytes(image_bytes(2))  # put into sources/ by hand, not by intake
    scan = scan_batch(root, "b1")
    assert [f.path for f in scan.files] == ["a.png"]
    assert [(p["file"], p["code"], p["severity"]) for p in scan.problems] == [
        ("caf\\xe9.png", "undecodable_name", "warning")
    ]
