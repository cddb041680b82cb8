"""The recipe's optimizer and learning-rate schedule (kohya's names, kohya's settings)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LRScheduler

from lora_pipeline.core.training.dadapt import DAdaptAdamW
from lora_pipeline.core.training.recipe import Recipe


def make_optimizer(recipe: Recipe, params: Iterable[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """DAdaptAdamW / Prodigy adapt the step size themselves (learning_rate 1.0 is the multiplier kohya uses);
    AdamW8bit keeps its moments in 8-bit blocks even for the smallest tensors (min_8bit_size=0)."""
    params = list(params)
    lr, decay = recipe.learning_rate, recipe.weight_decay
    if recipe.optimizer == "DAdaptAdamW":
        # dadaptation.DAdaptAdam(decouple=True)'s algorithm without its per-tensor host syncs (see dadapt.py)
        return DAdaptAdamW(params, lr=lr, weight_decay=decay)
    if recipe.optimizer == "Prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(params, lr=lr, decouple=True, weight_decay=decay)
    if recipe.optimizer == "AdamW8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=decay, min_8bit_size=0)
    if recipe.optimizer == "AdamW":
        # The fused kernel only exists on accelerators; on CPU the plain loop keeps runs bit-reproducible.
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay, fused=device.type == "cuda")
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}")  # parse_recipe only lets known names through


def make_lr_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    """diffusers' schedules; warm-up applies to constant_with_warmup, cosine and linear."""
    return get_scheduler(
        recipe.lr_scheduler, optimizer, num_warmup_steps=recipe.lr_warmup_steps, num_training_steps=total_steps
    )


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the step just taken; for DAdapt/Prodigy the adapted d * lr, as kohya logs it."""
    group = optimizer.param_groups[0]
    return float(group["lr"]) * float(group.get("d", 1.0))
