"""copy_file / copy_unread: a real, read-only copy (never a link), hashed from the bytes it copied or
copied in the kernel only while the source's stat vouches for a hash known beforehand."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import tempfile
from pathlib import Path

import pytest

from lora_pipeline.core.datasets.sources.copying import (
    BUFFER,
    copy_file,
    copy_unread,
    fsync_dir,
    stat_key,
    sync_filesystem,
)
from lora_pipeline.core.datasets.sources.regular_files import NotRegularFile


def assert_independent_read_only_copy(src: Path, dst: Path, data: bytes) -> None:
    assert dst.read_bytes() == data
    st = dst.lstat()
    assert stat.S_ISREG(st.st_mode) and not dst.is_symlink()
    assert stat.S_IMODE(st.st_mode) == 0o444
    assert st.st_nlink == 1 and st.st_ino != src.stat().st_ino


@pytest.mark.parametrize("size", [0, 1, 5000, BUFFER * 2 + 17])
def test_copy_is_an_independent_read_only_file_with_the_right_hash(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    src_state = (src.stat().st_mode, src.stat().st_mtime_ns)
    dst = tmp_path / "out" / "dst.bin"
    dst.parent.mkdir()

    copied = copy_file(src, dst)

    assert copied.method in ("reflink", "copy")
    assert copied.sha256 == hashlib.sha256(data).hexdigest() and copied.bytes == size
    assert copied.stable and stat_key(copied.before) == stat_key(src.stat())
    assert_independent_read_only_copy(src, dst, data)
    assert src.read_bytes() == data and (src.stat().st_mode, src.stat().st_mtime_ns) == src_state


@pytest.mark.parametrize("size", [0, 5000, BUFFER * 2 + 17])
def test_unread_copy_of_an_accepted_file_is_an_independent_read_only_file(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    dst = tmp_path / "dst.bin"
    seen = []

    copied = copy_unread(src, dst, lambda st: seen.append(stat_key(st)) or True)

    assert copied is not None and copied.sha256 is None and copied.bytes == size
    assert copied.method in ("reflink", "copy_file_range", "copy")
    assert seen == [stat_key(src.stat())] and copied.stable
    assert_independent_read_only_copy(src, dst, data)


def test_unread_copy_across_filesystems_falls_back_to_a_byte_copy(tmp_path: Path) -> None:
    """copy_file_range refuses a copy between two filesystems (EXDEV); the bytes are then copied through a
    buffer. /dev/shm is a tmpfs where it exists, so on most Linux machines this crosses filesystems."""
    data = random.Random(3).randbytes(300_000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    other = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else tmp_path))
    try:
        copied = copy_unread(src, other / "dst.bin", lambda st: True)
        assert copied is not None and copied.bytes == len(data)
        if other.stat().st_dev != tmp_path.stat().st_dev:
            assert copied.method == "copy"
        assert_independent_read_only_copy(src, other / "dst.bin", data)
        again = copy_unread(src, other / "again.bin", lambda st: True)  # the device pair is remembered
        assert again is not None and again.method == copied.method
        assert (other / "again.bin").read_bytes() == data
    finally:
        for path in other.iterdir():
            path.unlink()
        other.rmdir()


def test_unread_copy_is_refused_when_the_stat_does_not_vouch_or_changes_during_the_copy(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(b"x" * 1000)
    assert copy_unread(src, dst, lambda st: False) is None
    assert not os.path.lexists(dst)

    def writer_slips_in(st: os.stat_result) -> bool:
        """Approve the stat as it was, then let another writer append to the file before the copy."""
        with open(src, "ab") as f:
            f.write(b"y")
        return True

    assert copy_unread(src, dst, writer_slips_in) is None
    assert not os.path.lexists(dst)


def test_copy_never_overwrites_an_existing_file(tmp_path: Path) -> None:
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        copy_file(src, dst)
    with pytest.raises(FileExistsError):
        copy_unread(src, dst, lambda st: True)
    assert dst.read_bytes() == b"old"


def test_failed_copy_leaves_nothing_behind(tmp_path: Path) -> None:
    src = tmp_path / "folder"
    src.mkdir()  # a folder cannot be read as a file
    dst = tmp_path / "dst"
    with pytest.raises(NotRegularFile):
        copy_file(src, dst)
    assert not os.path.lexists(dst)


def test_sync_helpers_accept_a_folder(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"1")
    sync_filesystem(tmp_path)
    fsync_dir(tmp_path)
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "f")
