"""The denoiser's memory options of a recipe (fp8_base, blocks_to_swap, gradient_checkpointing) and the GPU's
peak memory per training stage."""

from __future__ import annotations

import torch
import torch.utils.checkpoint

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


def recompute(module: torch.nn.Module, *args: object) -> object:
    """diffusers' checkpointing call (non-reentrant) without saving the RNG state for the recomputation: the
    denoisers run no random op in their forward (peft's LoRA dropout is 0 here), so there is nothing to replay,
    and a checkpointed step then reads no generator state on the host, which lets a CUDA graph capture it (the fast
    path, step/fastpath.py). The gradients are those of the default call."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False)


def enable_checkpointing(denoiser: torch.nn.Module) -> None:
    """Gradient checkpointing of the denoiser's blocks through `recompute`."""
    denoiser.enable_gradient_checkpointing(recompute)


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
