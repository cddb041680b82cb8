"""Hidden staging folders beside a final name, and removing the ones whose process died.

A batch or a dataset version is built in `.<name>.tmp-<pid>-<random>` beside its final name and renamed
into place when complete. The building process holds an flock on the staging folder for as long as it
works in it; the kernel releases the lock when the process ends, however it ends (SIGKILL included).
So a staging folder whose lock can be taken belongs to nobody and is removed by `remove_abandoned`,
which intake and build call first. Creating a folder and taking its lock happen under an flock on the
parent folder, as does the clean-up, so a new folder is never mistaken for an abandoned one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

STAGING_GLOB = ".*.tmp-*"
Job = TypeVar("Job")
Result = TypeVar("Result")


def _open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


@contextmanager
def _locked(path: Path, flags: int = fcntl.LOCK_EX) -> Iterator[int]:
    fd = _open_dir(path)
    try:
        fcntl.flock(fd, flags)
        yield fd
    finally:
        os.close(fd)


@contextmanager
def staging_folder(parent: Path, name: str) -> Iterator[Path]:
    """A new, locked staging folder for `name` in `parent`, removed if the body raises (Ctrl-C included).

    The body renames it to its final name when it is complete; the lock is held until the body ends.
    """
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = -1
    try:  # from mkdir on: a Ctrl-C that lands right after it (as the CLI's interrupt test sends it) removes it too
        with _locked(parent):
            path.mkdir()
            fd = _open_dir(path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        if fd >= 0:
            os.close(fd)


def map_in_threads(fn: Callable[[Job], Result], jobs: Iterable[Job], workers: int) -> list[Result]:
    """`fn` of every job, in order, on `workers` threads, for work that writes into a staging folder: when
    anything raises (Ctrl-C included), no further job starts and this returns only once every job under way
    has ended, so nothing writes into the folder after `staging_folder` has removed it.

    `ThreadPoolExecutor.shutdown(wait=True)` alone does not promise that: an interrupt that lands while the
    pool is starting a worker thread leaves that thread running but unregistered, and shutdown does not join it.
    """
    gate = threading.Condition()
    state = {"open": True, "active": 0}

    def guarded(job: Job) -> Result:
        with gate:
            if not state["open"]:
                raise CancelledError
            state["active"] += 1
        try:
            return fn(job)
        finally:
            with gate:
                state["active"] -= 1
                gate.notify_all()

    pool = ThreadPoolExecutor(workers)
    try:
        return list(pool.map(guarded, jobs))
    except BaseException:
        with gate:
            state["open"] = False
            gate.wait_for(lambda: state["active"] == 0)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def remove_abandoned(parent: Path) -> list[str]:
    """Remove the staging folders in `parent` that no living process holds; returns their names."""
    if not parent.is_dir():
        return []
    removed = []
    with _locked(parent):
        for path in sorted(parent.glob(STAGING_GLOB)):
            try:
                fd = _open_dir(path)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue  # gone meanwhile, or not a folder we made
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its builder is alive
            else:
                shutil.rmtree(path)
                removed.append(path.name)
            finally:
                os.close(fd)
    return removed
