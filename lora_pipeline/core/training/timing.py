"""Wall time of training stages without stalling the GPU: CUDA events on a GPU, a host clock elsewhere."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageTimes:
    """Accumulates seconds per stage name; on CUDA the intervals are device events, read once in `seconds()`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = defaultdict(list)
        self._host: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events[name].append((start, end))
        else:
            started = time.perf_counter()
            yield
            self._host[name] += time.perf_counter() - started

    @contextmanager
    def host(self, name: str) -> Iterator[None]:
        """Host wall time of the block under `name` (host work: reading files, hashing, MLflow calls)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._host[name] += time.perf_counter() - started

    def add(self, name: str, seconds: float) -> None:
        """Add a host-measured interval (one that was synchronised by its caller)."""
        self._host[name] += seconds

    def seconds(self) -> dict[str, float]:
        totals = dict(self._host)
        if self._events:
            torch.cuda.synchronize()
            for name, pairs in self._events.items():
                totals[name] = totals.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs) / 1000
        return totals
