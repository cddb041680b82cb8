"""bitsandbytes' AdamW8bit without its per-parameter device synchronisation; why its step stays out of a CUDA graph.

`bitsandbytes.optim.Optimizer8bit.step` (0.50) calls `torch.cuda.synchronize()` after every parameter's update
(`sync_gpu(p)`): for a rank-32 SD1.5 LoRA, hundreds of full device syncs per step, which leave the GPU idle
between the step's kernels and keep the host from queueing ahead. The syncs serve paged state only (its
prefetches run on another stream); this subclass keeps them for `is_paged` and otherwise queues the same update
kernels in the same order, so the result is the reference's exactly (lora_pipeline_tests/test_prodigy.py).

The 8-bit update cannot be captured in a CUDA graph: each call passes the step count (bias correction) and the
learning rate to the kernel by value (`ct.c_int32(step)`, `ct.c_float(lr)` in bitsandbytes/backends/cuda/ops.py),
so a replay would repeat the recorded step's count and learning rate forever; and csrc/ops.cu launches the kernel
with `<<<blocks, threads>>>`, no stream: on the legacy default stream, which a capture on PyTorch's capture stream
refuses (cudaErrorStreamCaptureImplicit) and which does not wait for PyTorch's non-blocking side streams (so this
step orders itself after the current stream's work where that is not the default stream). The fast path
therefore captures forward, backward and clipping and runs this step eagerly after each replay (fastpath.py,
`StepParts.optimizer_in_graph`): the host queues its kernels behind the replay, with no sync in between.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import bitsandbytes
import torch
from bitsandbytes.utils import sync_gpu


class AdamW8bit(bitsandbytes.optim.AdamW8bit):
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        with _on_default_stream(self.param_groups[0]["params"][0].device):
            self._update_all()
        return loss

    def _update_all(self) -> None:
        """The reference's loop: per parameter the state (made at its first step) and one update kernel."""
        p = None
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
                if self.is_paged:
                    sync_gpu(p)
        if self.is_paged and p is not None:
            sync_gpu(p)


@contextmanager
def _on_default_stream(device: torch.device) -> Iterator[None]:
    """bitsandbytes' kernels go to the legacy default stream: ordered after the current stream's work (the
    gradients) and before what the current stream does next."""
    if device.type != "cuda" or torch.cuda.current_stream(device) == torch.cuda.default_stream(device):
        yield
        return
    current, default = torch.cuda.current_stream(device), torch.cuda.default_stream(device)
    default.wait_stream(current)
    yield
    current.wait_stream(default)
