"""Saving off the training thread: the epoch and step files, the resume state and the MLflow logging of a run are
jobs of one background thread (`BackgroundWriter`), so the next epoch trains while the last one is written.

- The training thread takes a snapshot of what a job writes (`to_host`: the LoRA tensors, the optimizer and
  schedule state), so training can change its tensors at once. On CUDA the copies go into pinned host memory
  with `non_blocking=True`, queued behind the epoch's last step; `submit` records a CUDA event after them and
  the writer waits for that event before it reads the copies. On a CPU they are plain clones.
- Jobs run one at a time in the order they were submitted: an epoch file lands (temp file, then rename) before
  the resume state that vouches for it, and both before anything of the next epoch (checkpoint.py).
- A job that fails fails the run with its own exception (a full disk stays the OSError that `own_output` turns
  into one line): `submit` and `close` raise it on the training thread, and the jobs after it are dropped, so no
  resume state is written after a failed epoch file. Leaving the `with` block waits for the jobs submitted so
  far, also when training itself failed (a resume then starts from the last state written).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch


def to_host(value: Any, pinned: bool) -> Any:
    """A copy of `value` (nested dicts, lists and tuples of tensors and plain values) whose tensors live on the
    host and are not shared with training: pinned, non-blocking copies of device tensors when `pinned` (valid
    once the stream reaches them: BackgroundWriter waits for that), clones of host tensors."""
    on_device = [t for t in _leaves(value) if t.device.type != "cpu"]
    buffers = iter(host_buffers(on_device, pinned))

    def copy(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cpu":
            return tensor.detach().clone()
        return next(buffers).copy_(tensor.detach(), non_blocking=pinned)

    return _mapped(value, copy)


ALIGNMENT = 64  # bytes: where each view of host_buffers starts


def host_buffers(tensors: list[torch.Tensor], pinned: bool) -> list[torch.Tensor]:
    """Empty host tensors of the shapes and dtypes of `tensors`: views into one allocation per dtype (pinned if
    asked), not one each: a snapshot is thousands of tensors (an SDXL LoRA with its optimizer state), and each
    pinned allocation is a driver call on the training thread (with one per tensor, saving took 9.4 s of an SDXL
    drill's training thread on an H100; with these, 5.5 s, most of it the last epoch's writes, which nothing is
    left to overlap). The views do not overlap, so safetensors and torch.save (which refuses one storage viewed as
    two dtypes) write them as separate tensors."""
    offsets: list[int] = []
    sizes: dict[torch.dtype, int] = {}
    for tensor in tensors:
        step = max(1, ALIGNMENT // tensor.element_size())
        offsets.append(-(-sizes.get(tensor.dtype, 0) // step) * step)
        sizes[tensor.dtype] = offsets[-1] + tensor.numel()
    blocks = {dtype: torch.empty(size, dtype=dtype, pin_memory=pinned) for dtype, size in sizes.items()}
    return [blocks[t.dtype][start:start + t.numel()].view(t.shape) for start, t in zip(offsets, tensors, strict=True)]


def _leaves(value: Any) -> list[torch.Tensor]:
    """The tensors of `value`, in the order `_mapped` visits them."""
    found: list[torch.Tensor] = []

    def note(tensor: torch.Tensor) -> torch.Tensor:
        found.append(tensor)
        return tensor

    _mapped(value, note)
    return found


def _mapped(value: Any, copy: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return copy(value)
    if isinstance(value, dict):
        return {key: _mapped(item, copy) for key, item in value.items()}
    if isinstance(value, list | tuple):
        copied = [_mapped(item, copy) for item in value]
        return copied if isinstance(value, list) else tuple(copied)
    return value


class BackgroundWriter:
    """One thread running submitted jobs in order (module docstring); use as a context manager."""

    def __init__(self, device: torch.device, name: str = "lora-writer"):
        self.cuda = device.type == "cuda"
        self.busy_seconds = 0.0  # the jobs' own time, on the writer's thread
        self._jobs: queue.Queue[tuple[Callable[[], Any], torch.cuda.Event | None] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            self._run(*item)
            # the job and its snapshot go now, not when the next job arrives: its host memory (pinned buffers
            # go back to PyTorch's cache, for the next epoch's snapshot) is not held through a whole epoch
            del item

    def _run(self, job: Callable[[], Any], ready: torch.cuda.Event | None) -> None:
        if self._error is not None:  # nothing is written after a failed write
            return
        started = time.perf_counter()
        try:
            if ready is not None:
                ready.synchronize()  # the non-blocking copies of the job's snapshot have landed
            job()
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread, which raises it
            self._error = exc
        self.busy_seconds += time.perf_counter() - started

    def check(self) -> None:
        """Raise the exception of a job that failed, if one did."""
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], Any]) -> None:
        """Queue `job` behind the jobs submitted before it (after raising an earlier job's failure)."""
        self.check()
        if not self._thread.is_alive():
            raise RuntimeError("the background writer is closed")
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record()
        self._jobs.put((job, ready))

    def wait(self) -> None:
        """Run every job submitted so far, stop the thread, and raise a failed job's exception."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self.check()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if exc is None:
            self.wait()
            return
        try:
            self.wait()
        except BaseException as failed:  # noqa: BLE001 - the training's own error is the one raised
            if failed is not exc:
                exc.add_note(f"the background writer failed too: {failed!r}")
