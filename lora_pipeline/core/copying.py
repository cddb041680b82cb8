"""Copying one file the copy-only way: a reflink clone or a byte copy, hashed on the way.

Never a hardlink or a symlink: both share (or point at) the source's bytes, so a later
edit of either side would silently change the other. A reflink clone is a real copy with
copy-on-write storage; where the filesystem cannot clone we copy bytes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FICLONE = 0x40049409  # _IOW(0x94, 9, int) from linux/fs.h
BUFFER = 4 << 20  # one read covers a typical training image; larger files loop
# errno values that mean "this filesystem (pair) cannot clone", not "this copy failed".
_NO_CLONE = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}

_no_clone_devices: set[tuple[int, int]] = set()
_local = threading.local()


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


def copy_file(src: Path, dst: Path) -> tuple[str, str]:
    """Copy `src` to the new file `dst` (which must not exist) and make it read-only (0o444).

    Returns (method, sha256) with method "reflink" or "copy". The sha256 is computed from the
    bytes as they pass through (a byte copy hashes and writes the same buffer; a clone hashes
    the source once), so every source file is read exactly once.
    """
    h = hashlib.sha256()
    buf = _buffer()
    with open(src, "rb", buffering=0) as fin:
        src_fd = fin.fileno()
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            devices = (os.fstat(src_fd).st_dev, os.fstat(dst_fd).st_dev)
            cloned = _try_clone(src_fd, dst_fd, devices)
            while n := fin.readinto(buf):
                chunk = buf[:n]
                h.update(chunk)
                if not cloned:
                    _write_all(dst_fd, chunk)
            os.fchmod(dst_fd, 0o444)
        except BaseException:
            os.close(dst_fd)
            os.unlink(dst)
            raise
        os.close(dst_fd)
    return ("reflink" if cloned else "copy"), h.hexdigest()


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
