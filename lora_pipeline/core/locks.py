"""Advisory file locks between processes (`fcntl.flock`).

The kernel drops a flock when its holder exits, however it exits (SIGKILL included), so a lock never
outlives a dead process and there is nothing to clean up by hand. The holder's pid is written into the
lock file, so a refused caller can say who holds it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_pipeline.core.errors import UserError


@contextmanager
def exclusive_lock(lock_file: Path, busy: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created if absent) for the `with` block.

    With `busy` (e.g. "already being trained") a lock held by another process is refused at once with
    UserError "<folder>: <busy> by pid N"; without it the call waits for the lock.
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            raise _busy(fd, lock_file, busy) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def refuse_if_locked(lock_file: Path, busy: str) -> None:
    """The refusal `exclusive_lock(lock_file, busy)` would give, without taking the lock or creating anything: a
    caller checks this before seconds of set-up (imports, model loads) and takes the lock itself afterwards.
    Probed with a shared lock, which conflicts only with a holder's exclusive one."""
    try:
        fd = os.open(lock_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return  # never locked here
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(fd, lock_file, busy) from None
    finally:
        os.close(fd)


def _busy(fd: int, lock_file: Path, busy: str) -> UserError:
    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
    return UserError(f"{busy} by pid {holder} (lock {lock_file.name})", lock_file.parent)
