"""CPU threads for training on a shared machine, and in-epoch progress lines.

On a busy machine, OpenMP threads that spin while waiting for each other (the default, `OMP_WAIT_POLICY=active`)
fight the other processes for the cores and turn a small slowdown into a collapse: a 2-core machine at load 6-11
ran the demo's training at a hundredth of its quiet speed. So the command line and the code location ask for the
passive wait policy before torch loads its OpenMP runtime (core/runtime.py), and CPU training uses as many
threads as there are cores not already kept busy by others (the 1-minute load average), at least one. A thread
count the user set (`OMP_NUM_THREADS`) is left alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

PROGRESS_SECONDS = 15.0  # at most one progress line per this many seconds within an epoch


def training_threads() -> int | None:
    """Threads for CPU training: the usable cores less those others keep busy, at least 1; None when the user
    chose with OMP_NUM_THREADS."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0))
    busy = int(os.getloadavg()[0])
    return max(1, min(cores, cores - busy))


class Progress:
    """Progress within a run: `step(done)` says, at most every PROGRESS_SECONDS, how far training is, at what
    speed and when it will end (steps over the whole run, images/s since the epoch began)."""

    def __init__(self, log: Callable[[str], None], epochs: int, total_steps: int, batch_size: int) -> None:
        self.log, self.epochs, self.total, self.batch_size = log, epochs, total_steps, batch_size
        self.epoch, self.epoch_steps, self.epoch_first, self.started, self.last = 0, 0, 0, 0.0, 0.0

    def begin_epoch(self, epoch: int, steps: int, first_step: int) -> None:
        self.epoch, self.epoch_steps, self.epoch_first = epoch, steps, first_step
        self.started = self.last = time.perf_counter()

    def step(self, step: int) -> None:
        now = time.perf_counter()
        if now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        done = step - self.epoch_first + 1
        per_step = (now - self.started) / done
        eta = per_step * (self.total - step)
        self.log(f"epoch {self.epoch}/{self.epochs}: step {done}/{self.epoch_steps} (run {step}/{self.total}), "
                 f"{self.batch_size / per_step:.2f} images/s, ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
