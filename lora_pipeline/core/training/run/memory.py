"""The denoiser's memory options of a recipe (fp8_base, blocks_to_swap, gradient_checkpointing) and the GPU's
peak memory per training stage.

Gradient checkpointing recomputes a block's forward during the backward. Its attention must run the SDPA kernel
the forward ran: another kernel saves tensors of other shapes (flash attention's log-sum-exp, say), which torch
refuses ("CheckpointError: Recomputed values ... have different metadata"). `checkpoint` makes the recomputation
re-enter the kernels that were allowed when the forward ran, wherever the backward is called, for every family's
denoiser (the trainer's step, the benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel

from lora_pipeline.core.models.families.base import ModelFamily
from lora_pipeline.core.models.offload import BlockSwap, store_linears_in_fp8
from lora_pipeline.core.training.recipe import Recipe


def lighten_denoiser(denoiser: torch.nn.Module, family: ModelFamily, recipe: Recipe, device: torch.device
                     ) -> BlockSwap | None:
    """Apply the recipe's memory options to the denoiser (its LoRA already added, still on the CPU) and move it
    to `device`, the swapped blocks' frozen weights excepted; the BlockSwap when blocks are swapped."""
    if recipe.fp8_base:
        store_linears_in_fp8(denoiser)
    if recipe.gradient_checkpointing:
        enable_checkpointing(denoiser)
    if not recipe.blocks_to_swap:
        denoiser.to(device)
        return None
    swap = BlockSwap(family.swapped_blocks(denoiser, recipe.blocks_to_swap), device)
    for tensor in [*denoiser.parameters(), *denoiser.buffers()]:
        if id(tensor) not in swap.swapped:
            tensor.data = tensor.data.to(device)
    return swap


_SDPA_SWITCHES: tuple[tuple[SDPBackend, Callable[[], bool]], ...] = (
    (SDPBackend.CUDNN_ATTENTION, torch.backends.cuda.cudnn_sdp_enabled),
    (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled),
    (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled),
    (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled),
)


def sdpa_backends() -> list[SDPBackend]:
    """The SDPA kernels allowed now (all by default; those of the innermost `sdpa_kernel(...)` inside one)."""
    return [backend for backend, enabled in _SDPA_SWITCHES if enabled()]


def _same_attention(backends: list[SDPBackend]) -> AbstractContextManager:
    return sdpa_kernel(backends) if backends else nullcontext()


def checkpoint(module: torch.nn.Module, *args: Any) -> Any:
    """diffusers' checkpointing function (`enable_gradient_checkpointing(gradient_checkpointing_func=...)`):
    torch's non-reentrant checkpoint of `module(*args)` whose recomputation runs under the forward's SDPA kernels.

    No RNG state is saved for the recomputation (`preserve_rng_state=False`): the denoisers run no random op in
    their forward (peft's LoRA dropout is 0 here), so there is nothing to replay, and a checkpointed step then
    reads no generator state on the host, which lets a CUDA graph capture it (the fast path, step/fastpath.py).
    The gradients are those of the default call."""
    backends = sdpa_backends()
    return torch.utils.checkpoint.checkpoint(
        module.__call__, *args, use_reentrant=False, preserve_rng_state=False,
        context_fn=lambda: (nullcontext(), _same_attention(backends)))


def enable_checkpointing(denoiser: torch.nn.Module) -> None:
    """Gradient checkpointing of a diffusers denoiser (U-Net or transformer) through `checkpoint`."""
    denoiser.enable_gradient_checkpointing(checkpoint)  # type: ignore[operator]


class PeakMemory:
    """torch.cuda.max_memory_allocated per stage, in GiB (nothing on a CPU): `mark(stage)` reads the peak since
    the previous mark (or the start) and starts counting afresh."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.gib = device, {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def mark(self, stage: str) -> None:
        if self.device.type == "cuda":
            self.gib[stage] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
