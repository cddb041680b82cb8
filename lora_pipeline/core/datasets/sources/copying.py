"""Copying one file the copy-only way: a reflink clone or a byte copy, never a link.

Never a hardlink or a symlink: both share (or point at) the source's bytes, so a later
edit of either side would silently change the other. A reflink clone is a real copy with
copy-on-write storage; where the filesystem cannot clone we copy bytes.

Two ways to copy: `copy_file` hashes the bytes as they pass through (the hash always describes
the copy), and `copy_unread` copies inside the kernel (clone, else copy_file_range) for a file
whose hash is already known, checking the source's stat before and after so that a file that
changed meanwhile is refused rather than given its old hash.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lora_pipeline.core.datasets.sources.regular_files import open_regular
from lora_pipeline.core.fileio import name_os_error

FICLONE = 0x40049409  # _IOW(0x94, 9, int) from linux/fs.h
BUFFER = 4 << 20  # one read covers a typical training image; larger files loop
# errno values that mean "this filesystem (pair) cannot clone", not "this copy failed".
_NO_CLONE = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}
# errno values that mean "no copy_file_range between these two files": fall back to read/write.
_NO_RANGE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}

_no_clone_devices: set[tuple[int, int]] = set()
_no_range_devices: set[tuple[int, int]] = set()
_local = threading.local()

StatKey = tuple[int, int, int, int, int]


def stat_key(st: os.stat_result) -> StatKey:
    """What identifies one version of a file: size, mtime, ctime (no call can set it), inode, device."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


@dataclass(frozen=True)
class Copied:
    """One finished copy and the source's stat around it."""

    method: str  # "reflink", "copy_file_range" (in the kernel) or "copy" (through a user-space buffer)
    sha256: str | None  # of the copied bytes; None when `copy_unread` never read them
    bytes: int
    before: os.stat_result  # the source when it was opened
    after: os.stat_result  # the source once the copy was complete

    @property
    def stable(self) -> bool:
        """The source did not change while it was copied."""
        return stat_key(self.before) == stat_key(self.after)


def _buffer() -> memoryview:
    """One reusable buffer per thread, so a copy allocates nothing per file."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(bytearray(BUFFER))
    return buf


def _try_clone(src_fd: int, dst_fd: int, devices: tuple[int, int]) -> bool:
    """Reflink src into dst; False (remembered per device pair) where the filesystem cannot."""
    if devices in _no_clone_devices:
        return False
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as exc:
        if exc.errno not in _NO_CLONE:
            raise
        _no_clone_devices.add(devices)
        return False
    return True


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _pump(fin: BinaryIO, dst_fd: int | None, h: hashlib._Hash | None) -> int:
    """Read `fin` to its end through the thread's buffer, hashing and/or writing each chunk; bytes read."""
    buf, total = _buffer(), 0
    while n := fin.readinto(buf):
        chunk = buf[:n]
        if h is not None:
            h.update(chunk)
        if dst_fd is not None:
            _write_all(dst_fd, chunk)
        total += n
    return total


def _copy_range(src_fd: int, dst_fd: int, size: int) -> int:
    """copy_file_range until `size` bytes are copied or the source ends; bytes copied."""
    done = 0
    while done < size and (n := os.copy_file_range(src_fd, dst_fd, size - done)):
        done += n
    return done


@contextmanager
def _new_file(dst: Path) -> Iterator[int]:
    """A new file at `dst` (never an existing one): read-only (0o444) when the body succeeds, removed if it fails."""
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        yield fd
        os.fchmod(fd, 0o444)
    except BaseException:
        os.close(fd)
        os.unlink(dst)
        raise
    os.close(fd)


@contextmanager
def _naming(dst: Path) -> Iterator[None]:
    """An OSError of the copy's reads and writes (a full disk) names the copy, so its one line says where."""
    try:
        yield
    except OSError as exc:
        name_os_error(exc, dst)
        raise


def copy_file(src: Path, dst: Path) -> Copied:
    """Copy `src` to the new file `dst` (which must not exist), read-only, hashing the bytes on the way.

    A byte copy hashes and writes the same buffer, so the hash describes the copy even if the
    source is being changed. A clone hashes the source (already cached in memory, unlike the
    clone's pages); should the source have changed meanwhile, the clone itself is hashed instead.
    """
    h = hashlib.sha256()
    with open_regular(src) as fin, _new_file(dst) as dst_fd, _naming(dst):
        before = os.fstat(fin.fileno())
        cloned = _try_clone(fin.fileno(), dst_fd, (before.st_dev, os.fstat(dst_fd).st_dev))
        size = _pump(fin, None if cloned else dst_fd, h)
        after = os.fstat(fin.fileno())
        if cloned and stat_key(after) != stat_key(before):
            h = hashlib.sha256()
            with open(dst_fd, "rb", buffering=0, closefd=False) as clone:
                size = _pump(clone, None, h)
    return Copied("reflink" if cloned else "copy", h.hexdigest(), size, before, after)


def copy_unread(src: Path, dst: Path, accept: Callable[[os.stat_result], bool]) -> Copied | None:
    """Copy `src` to the new read-only file `dst` inside the kernel, for a file whose hash is known.

    `accept` judges the source's stat when it is opened: does the known hash still describe it?
    Returns None, leaving no `dst`, when it does not, or when the source changed during the copy
    (the caller then copies it with `copy_file`). A clone where the filesystem offers one, else
    copy_file_range, else (another filesystem, no kernel support) a byte copy through a buffer.
    """
    with open_regular(src) as fin:
        src_fd = fin.fileno()
        before = os.fstat(src_fd)
        if not accept(before):
            return None
        with _new_file(dst) as dst_fd, _naming(dst):
            devices = (before.st_dev, os.fstat(dst_fd).st_dev)
            method, size = "reflink", before.st_size
            if not _try_clone(src_fd, dst_fd, devices):
                method, size = _kernel_copy(fin, dst_fd, before.st_size, devices)
        after = os.fstat(src_fd)
    if size != before.st_size or stat_key(after) != stat_key(before):
        os.unlink(dst)
        return None
    return Copied(method, None, size, before, after)


def _kernel_copy(fin: BinaryIO, dst_fd: int, size: int, devices: tuple[int, int]) -> tuple[str, int]:
    """copy_file_range where the kernel offers it for this device pair, else a byte copy; (method, bytes)."""
    done = 0
    if devices not in _no_range_devices:
        try:
            return "copy_file_range", _copy_range(fin.fileno(), dst_fd, size)
        except OSError as exc:
            if exc.errno not in _NO_RANGE:
                raise
            _no_range_devices.add(devices)
            # Both file offsets stand after what was copied, so the byte copy carries on from there.
            done = fin.tell()
    return "copy", done + _pump(fin, dst_fd, None)


def sync_filesystem(path: Path) -> None:
    """Flush every dirty page of the filesystem holding `path` (Linux syncfs; else a global sync).

    One syncfs after a batch of copies lets the kernel write back in large runs, far cheaper
    than an fsync per file, and makes the copies durable before we rename them into place.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
        if syncfs is None:
            os.sync()
        elif syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


@contextmanager
def background_writeback(path: Path, interval: float = 0.05) -> Iterator[None]:
    """While the body copies files, keep flushing the filesystem of `path` from a second thread.

    Disk writes then overlap the copying (CPU-bound: hashing) instead of all waiting for the final
    `sync_filesystem`, which is left with little to do. A failed flush is raised here on exit.
    """
    stop = threading.Event()
    failures: list[BaseException] = []

    def flush() -> None:
        try:
            while not stop.wait(interval):
                sync_filesystem(path)
        except BaseException as exc:  # handed to the caller's thread below
            failures.append(exc)

    thread = threading.Thread(target=flush, name="background-writeback", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if failures:
        raise failures[0]


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
