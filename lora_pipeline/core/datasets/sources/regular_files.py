"""The one way a batch file (image, caption sidecar, caption table, attribute file) or a snapshot file is opened.

A handoff is not trusted: `a.txt` may be a symbolic link to a file outside the batch, `a.png` a FIFO that
blocks a reader forever, a 120 MB "caption" would keep the report busy for minutes. Every reader opens
through `open_regular`, which refuses a symbolic link (O_NOFOLLOW: the kernel does not follow it, so a
link swapped in after a scan is refused too) and anything that is not a regular file (checked with fstat
on the opened descriptor, opened non-blocking so a FIFO cannot hang the open). `read_regular` reads at
most a limit, never the whole of an oversized file.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from lora_pipeline.core.errors import UserError

CAPTION_LIMIT = 64 * 1024  # bytes of one caption file; kohya captions are a line of tags
TABLE_LIMIT = 64 * 1024 * 1024  # bytes of a caption or attribute table


class NotRegularFile(UserError):
    """A path that is a symbolic link (`code` "symlink_not_followed") or no regular file ("not_a_regular_file")."""

    def __init__(self, path: Path, code: str) -> None:
        self.code = code
        what = "symbolic link, not followed" if code == "symlink_not_followed" else "not a regular file"
        super().__init__(f"{what}; nothing was read from it", path)


class FileTooLarge(UserError):
    """A file bigger than a reader's limit; only the first limit + 1 bytes were read."""

    def __init__(self, path: Path, limit: int) -> None:
        self.limit = limit
        super().__init__(f"larger than the limit of {limit:,} bytes; it was not read", path)


def open_regular(path: Path, buffered: bool = False) -> BinaryIO:
    """`path` opened for binary reading, refusing links and anything but a regular file.

    FileNotFoundError propagates for a missing file; a link or a special file raises NotRegularFile.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link as the last component
            raise NotRegularFile(path, "symlink_not_followed") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(path, "not_a_regular_file")
        os.set_blocking(fd, True)
        return open(fd, "rb", buffering=-1 if buffered else 0, closefd=True)
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (FileTooLarge beyond, after reading limit + 1)."""
    with open_regular(path) as f:
        data = bytearray()
        while len(data) <= limit and (chunk := f.read(limit + 1 - len(data))):
            data += chunk
    if len(data) > limit:
        raise FileTooLarge(path, limit)
    return bytes(data)


def is_regular(path: Path) -> bool:
    """True for a regular file that is not a symbolic link (lstat; no file is opened)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
