"""The one way a batch file (image, caption sidecar, caption table, attribute file) or a snapshot file is opened.

A handoff is not trusted: `a.txt` may be a symbolic link to a file outside the batch, `a.png` a FIFO that
blocks a reader forever, a 120 MB "caption" would keep the report busy for minutes. Every reader opens
through `open_regular`, which refuses a symbolic link (O_NOFOLLOW: the kernel does not follow it, so a
link swapped in after a scan is refused too) and anything that is not a regular file (checked with fstat
on the opened descriptor, opened non-blocking so a FIFO cannot hang the open). `read_regular` reads at
most a limit, never the whole of an oversized file.

Given `beneath` (the data root, a snapshot folder), the path must lie inside it and every folder on the way
down is opened without following a link either (each component with O_NOFOLLOW relative to the one above,
openat-style): `img/1_x` replaced by a link to an identical folder outside the root is refused like a linked
file. Every read of a file under the data root (snapshot and batch files, captions that provenance shows,
cache entries, the inputs of training and evaluation) goes through this module.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_stream

CAPTION_LIMIT = 64 * 1024  # bytes of one caption file; kohya captions are a line of tags
TABLE_LIMIT = 64 * 1024 * 1024  # bytes of a caption or attribute table


class NotRegularFile(UserError):
    """A path that is a symbolic link (`code` "symlink_not_followed"), no regular file ("not_a_regular_file"), or
    outside the folder it must lie in ("outside_the_folder")."""

    def __init__(self, path: Path, code: str, folder: Path | None = None) -> None:
        self.code = code
        what = {"symlink_not_followed": "symbolic link, not followed",
                "outside_the_folder": f"outside {folder}"}.get(code, "not a regular file")
        super().__init__(f"{what}; nothing was read from it", path)


class FileTooLarge(UserError):
    """A file bigger than a reader's limit; only the first limit + 1 bytes were read."""

    def __init__(self, path: Path, limit: int) -> None:
        self.limit = limit
        super().__init__(f"larger than the limit of {limit:,} bytes; it was not read", path)


def _refused(path: Path, exc: OSError) -> OSError:
    """O_NOFOLLOW met a link (ELOOP; ENOTDIR for a link opened as a folder): NotRegularFile; else `exc`."""
    if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and os.path.islink(path)):
        return NotRegularFile(path, "symlink_not_followed")
    return exc


def _parent_fd(path: Path, beneath: Path) -> tuple[int, str]:
    """(descriptor of `path`'s folder, its last name), each folder below `beneath` opened without following a
    link. A path outside `beneath` (or stepping up with ..) is refused as not a regular file of it."""
    try:
        parts = path.relative_to(beneath).parts
    except ValueError:
        parts = ()
    if not parts or ".." in parts:
        raise NotRegularFile(path, "outside_the_folder", beneath)
    fd = os.open(beneath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = beneath
    try:
        for part in parts[:-1]:
            walked = walked / part
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                raise _refused(walked, exc) from None
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


def open_regular(path: Path, buffered: bool = False, beneath: Path | None = None) -> BinaryIO:
    """`path` opened for binary reading, refusing links and anything but a regular file; with `beneath`, also
    a path outside that folder and a link anywhere on the way down from it.

    FileNotFoundError propagates for a missing file; a link or a special file raises NotRegularFile.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    dir_fd, name = (None, str(path)) if beneath is None else _parent_fd(path, beneath)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        raise _refused(path, exc) from None
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(path, "not_a_regular_file")
        os.set_blocking(fd, True)
        return open(fd, "rb", buffering=-1 if buffered else 0, closefd=True)
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path, limit: int, beneath: Path | None = None) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (FileTooLarge beyond, after reading limit + 1)."""
    with open_regular(path, beneath=beneath) as f:
        data = bytearray()
        while len(data) <= limit and (chunk := f.read(limit + 1 - len(data))):
            data += chunk
    if len(data) > limit:
        raise FileTooLarge(path, limit)
    return bytes(data)


def sha256_regular(path: Path, beneath: Path | None = None) -> str:
    """The sha256 of a regular file, read through `open_regular` (a link or a FIFO is refused, never read)."""
    with open_regular(path, buffered=True, beneath=beneath) as f:
        return sha256_stream(f)[0]


def is_regular(path: Path, beneath: Path | None = None) -> bool:
    """True for a regular file that is not a symbolic link (lstat; no file is opened); with `beneath`, no folder
    between it and the file may be a link either."""
    try:
        if beneath is not None:
            parts = path.relative_to(beneath).parts
            if ".." in parts or any(os.path.islink(beneath.joinpath(*parts[:i])) for i in range(1, len(parts))):
                return False
        return stat.S_ISREG(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return False


def irregular_entries(folder: Path) -> list[str]:
    """What under `folder` is neither a regular file nor a folder holding something: links, FIFOs, sockets,
    devices and empty folders, as paths relative to `folder` (links are listed, never followed)."""
    found = []
    for parent, dirs, files in os.walk(folder):  # os.walk lists a link to a folder among `dirs`, never enters it
        here = Path(parent)
        if not dirs and not files and here != folder:
            found.append(here.relative_to(folder).as_posix())
        for name in [*dirs, *files]:
            mode = os.lstat(here / name).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                found.append((here / name).relative_to(folder).as_posix())
    return sorted(found)
