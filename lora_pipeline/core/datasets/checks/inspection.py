"""Inspecting every image of a snapshot in worker processes, optionally started early.

`inspect_batch` runs `images.inspect_with_thumbnail` for many files on a pool of worker processes (results
in the order of the paths) and keeps the few thumbnails a contact sheet will likely show, so that one decode
per image serves the checks, the hashes and the sheet.

A build executed in one process (the command line runs its Dagster job in-process) does not have to wait
for the decode: `start_early`, called as soon as the snapshot is copied, puts the files to the workers, and
`take_early`, called by the validation, collects what they found while captions were written and Dagster
recorded the steps in between. It hands the results over only for exactly the same files, unchanged since
(same path list, limits, device, inode, size, mtime and ctime); otherwise it returns None and the caller
inspects again. A run whose steps run in separate processes never starts early, so nothing is found.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lora_pipeline.core.datasets.images import ImageInfo, Inspected, Thumbnails, inspect_with_thumbnail

# Below this many files a process pool costs more to start than it saves.
POOL_THRESHOLD = 32
CHUNK = 16  # files per task: large enough to hide the hand-off, small enough to balance the two workers

Job = tuple[Path, int, Thumbnails]


@dataclass(frozen=True)
class Inspection:
    infos: list[ImageInfo]  # in the order of the paths
    thumbnails: dict[int, Image.Image]  # by index into the paths


def _identity(path: Path) -> tuple[int, ...]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _inspect_chunk(jobs: list[Job]) -> list[Inspected]:
    return [inspect_with_thumbnail(*job) for job in jobs]


class InspectionJob:
    """The inspection of a list of files, under way in `workers` processes (or done at once in this one when
    there are few files or one worker); `result()` waits for it."""

    def __init__(self, paths: Sequence[Path], max_pixels: int, workers: int = 2, thumbnails: int = 0):
        self.key = (tuple(str(p) for p in paths), max_pixels, thumbnails)
        self.identities = [_identity(Path(p)) for p in paths]
        self.thumbnails = thumbnails
        first, rest = ("all", "flagged") if thumbnails > 0 else ("none", "none")
        jobs: list[Job] = [(Path(p), max_pixels, first if i < 2 * thumbnails else rest) for i, p in enumerate(paths)]
        self._pool: ProcessPoolExecutor | None = None
        self._futures: list[Future[list[Inspected]]] = []
        self._serial: list[Job] = []
        if workers <= 1 or len(jobs) < POOL_THRESHOLD:
            self._serial = jobs
            return
        # forkserver: workers fork from a clean single-threaded server (forking a Dagster run, which has
        # threads, can deadlock); the server imports the image code once, so workers start without importing.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
        self._futures = [self._pool.submit(_inspect_chunk, jobs[i : i + CHUNK]) for i in range(0, len(jobs), CHUNK)]

    def unchanged(self, paths: Sequence[Path], max_pixels: int, thumbnails: int) -> bool:
        """Whether this job inspects exactly these files, as they are now."""
        if self.key != (tuple(str(p) for p in paths), max_pixels, thumbnails):
            return False
        try:
            return [_identity(Path(p)) for p in paths] == self.identities
        except OSError:
            return False

    def result(self) -> Inspection:
        try:
            if self._pool is None:
                return _keep_thumbnails(_inspect_chunk(self._serial), self.thumbnails)
            return _keep_thumbnails((r for f in self._futures for r in f.result()), self.thumbnails)
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop: files not yet started are dropped; the workers exit after the file each is on."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _keep_thumbnails(results: Iterable[Inspected], thumbnails: int) -> Inspection:
    """Thumbnails of the first 2 x `thumbnails` files and of the first `thumbnails` files with a problem of
    their own: a sheet of `thumbnails` cells shows problem files first, then the others in path order. A file
    flagged only later (a near duplicate) is decoded again by the sheet; memory stays bounded either way."""
    infos, kept, flagged = [], {}, 0
    for i, (info, thumb) in enumerate(results):
        infos.append(info)
        if thumb is None:
            continue
        if i < 2 * thumbnails:
            kept[i] = thumb
        elif info.problems and flagged < thumbnails:
            kept[i] = thumb
            flagged += 1
    return Inspection(infos, kept)


def inspect_batch(paths: Sequence[Path], max_pixels: int, workers: int = 2, thumbnails: int = 0) -> Inspection:
    """Every file inspected (`images.inspect_with_thumbnail`) in `workers` processes, with the thumbnails a
    contact sheet of `thumbnails` cells is likely to show (see `_keep_thumbnails`)."""
    return InspectionJob(paths, max_pixels, workers, thumbnails).result()


def inspect_images(paths: Sequence[Path], max_pixels: int, workers: int = 2) -> list[ImageInfo]:
    """`images.inspect_image` for many files, in `workers` processes, in the order of `paths`."""
    return inspect_batch(paths, max_pixels, workers).infos


_early: InspectionJob | None = None


def start_early(paths: Sequence[Path], max_pixels: int, thumbnails: int = 0, workers: int = 2) -> None:
    """Start inspecting `paths` now, for a `take_early` later in this process (replaces any earlier start)."""
    global _early
    discard_early()
    _early = InspectionJob(paths, max_pixels, workers, thumbnails)


def take_early(paths: Sequence[Path], max_pixels: int, thumbnails: int = 0) -> Inspection | None:
    """What `start_early` found, when it inspected exactly these unchanged files; else None (and it stops)."""
    global _early
    job, _early = _early, None
    if job is None:
        return None
    if not job.unchanged(paths, max_pixels, thumbnails):
        job.cancel()
        return None
    return job.result()


def discard_early() -> None:
    """Stop an early inspection nobody took (the run failed before its validation)."""
    global _early
    job, _early = _early, None
    if job is not None:
        job.cancel()
