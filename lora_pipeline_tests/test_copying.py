"""copy_file: a real, read-only copy (never a link), hashed from the bytes it copied."""

from __future__ import annotations

import hashlib
import os
import random
import stat
from pathlib import Path

import pytest

from lora_pipeline.core.copying import BUFFER, copy_file, fsync_dir, sync_filesystem


@pytest.mark.parametrize("size", [0, 1, 5000, BUFFER * 2 + 17])
def test_copy_is_an_independent_read_only_file_with_the_right_hash(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    src_state = (src.stat().st_mode, src.stat().st_mtime_ns)
    dst = tmp_path / "out" / "dst.bin"
    dst.parent.mkdir()

    method, sha = copy_file(src, dst)

    assert method in ("reflink", "copy")
    assert sha == hashlib.sha256(data).hexdigest()
    assert dst.read_bytes() == data
    st = dst.lstat()
    assert stat.S_ISREG(st.st_mode) and not dst.is_symlink()
    assert stat.S_IMODE(st.st_mode) == 0o444
    assert st.st_nlink == 1 and st.st_ino != src.stat().st_ino
    assert src.read_bytes() == data and (src.stat().st_mode, src.stat().st_mtime_ns) == src_state


def test_copy_never_overwrites_an_existing_file(tmp_path: Path) -> None:
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        copy_file(src, dst)
    assert dst.read_bytes() == b"old"


def test_failed_copy_leaves_nothing_behind(tmp_path: Path) -> None:
    src = tmp_path / "folder"
    src.mkdir()  # reading a folder fails after the destination was created
    dst = tmp_path / "dst"
    with pytest.raises(IsADirectoryError):
        copy_file(src, dst)
    assert not os.path.lexists(dst)


def test_sync_helpers_accept_a_folder(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"1")
    sync_filesystem(tmp_path)
    fsync_dir(tmp_path)
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "f")
