"""The recipe's optimizer and learning-rate schedule (kohya's names, kohya's settings): its `optimizer_settings` and
`schedule` groups."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LRScheduler

from lora_pipeline.core.training.recipe_groups import OptimizerSettings, ScheduleSettings
from lora_pipeline.core.training.step.dadapt import DAdaptAdamW

Params = Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]]


def make_optimizer(settings: OptimizerSettings, schedule: ScheduleSettings, params: Params,
                   device: torch.device) -> torch.optim.Optimizer:
    """DAdaptAdamW / Prodigy adapt the step size themselves (learning_rate 1.0 is the multiplier kohya uses);
    AdamW8bit keeps its moments in 8-bit blocks even for the smallest tensors (min_8bit_size=0).

    As kohya: Lion is lion-pytorch's; Adafactor is transformers' with relative_step (its own step size,
    learning_rate only the schedule's initial_lr) unless `adafactor_relative_step: false`; AdamWScheduleFree is
    the schedulefree package's (no schedule; lr_warmup_steps is its warmup). `params` may be parameter groups
    (a text-encoder group with its own lr). `optimizer_args` (kohya's --optimizer_args, keys checked by the recipe,
    optimizer_args.py) go to the constructor and replace these defaults and the weight_decay field."""
    params = list(params)
    lr, name = settings.learning_rate, settings.optimizer
    args = {"weight_decay": settings.weight_decay, **(settings.optimizer_args or {})}  # kohya's --optimizer_args
    if name == "Lion":
        import lion_pytorch

        return lion_pytorch.Lion(params, lr=lr, **args)
    if name == "Adafactor":
        from transformers.optimization import Adafactor

        relative = settings.adafactor_relative_step
        return Adafactor(params, lr=None if relative else lr, relative_step=relative,
                         **{"scale_parameter": relative, "warmup_init": False, **args})
    if name == "AdamWScheduleFree":
        import schedulefree

        optimizer = schedulefree.AdamWScheduleFree(params, lr=lr, warmup_steps=schedule.lr_warmup_steps,
                                                   foreach=device.type == "cuda", **args)
        optimizer.train()
        return optimizer
    if name == "DAdaptAdamW":
        # dadaptation.DAdaptAdam(decouple=True)'s algorithm without its per-tensor host syncs (see dadapt.py)
        return DAdaptAdamW(params, lr=lr, **args)
    if name == "Prodigy":
        # prodigyopt.Prodigy's algorithm with its state on the device (prodigy.py): no host syncs, capturable
        from lora_pipeline.core.training.step.prodigy import Prodigy

        return Prodigy(params, lr=lr, **{"decouple": True, **args})
    if name == "AdamW8bit":
        # bitsandbytes' AdamW8bit without its device sync after every parameter (adamw8bit.py)
        from lora_pipeline.core.training.step.adamw8bit import AdamW8bit

        return AdamW8bit(params, lr=lr, **{"min_8bit_size": 0, **args})
    if name == "AdamW":
        # The fused kernel only exists on accelerators; on CPU the plain loop keeps runs bit-reproducible.
        # capturable: the step count stays on the device, so the fast path can capture the step (fastpath.py).
        cuda = device.type == "cuda"
        return torch.optim.AdamW(params, lr=lr, fused=cuda, capturable=cuda, **args)
    raise ValueError(f"unknown optimizer {name!r}")  # parse_recipe only lets known names through


def groups_to_device(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """After `load_state_dict` of a resume state (read onto the CPU): the device-side scalars of the parameter groups
    (DAdaptAdamW's and Prodigy's d, numerator, step count) back on the training device. torch moves the per-parameter
    state but not these; left on the CPU, every step would copy them back (a host sync) and the fast path could not
    capture the step."""
    for group in optimizer.param_groups:
        for key, value in group.items():
            if key != "params" and isinstance(value, torch.Tensor) and value.device != device:
                group[key] = value.to(device)


def make_lr_scheduler(settings: OptimizerSettings, schedule: ScheduleSettings, optimizer: torch.optim.Optimizer,
                      total_steps: int) -> LRScheduler:
    """diffusers' schedules as kohya's get_scheduler_fix calls them (warm-up for all but constant; num_cycles for
    cosine_with_restarts, power for polynomial); relative-step Adafactor gets transformers' AdafactorSchedule
    (kohya's `adafactor:<lr>`), which reports the step size Adafactor chose."""
    if settings.relative_step:
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer, settings.learning_rate)
    warmup = 0 if settings.optimizer == "AdamWScheduleFree" else schedule.lr_warmup_steps  # the optimizer warms up
    return get_scheduler(
        schedule.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
        num_cycles=schedule.lr_scheduler_num_cycles, power=schedule.lr_scheduler_power,
    )


@contextmanager
def averaged_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Schedule-free optimizers train on an interpolated point and keep the averaged weights apart: while
    saving or sampling the parameters must hold the averaged weights (`eval()`), then go back (`train()`),
    as kohya does. Other optimizers: nothing to do."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if type(inner).__module__.split(".")[0] != "schedulefree":
        yield
        return
    inner.eval()
    try:
        yield
    finally:
        inner.train()


def step_lr(optimizer: torch.optim.Optimizer) -> tuple[float, torch.Tensor | float]:
    """The factors of the step just taken's learning rate, read without a host sync: (lr, d), where d is the
    adapted step size of DAdapt/Prodigy (a copy of DAdaptAdamW's device tensor) and 1.0 otherwise; relative-step
    Adafactor's own step size is (1.0, the size it took), computed as Adafactor computes it."""
    group = optimizer.param_groups[0]
    if group.get("relative_step"):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        size = inner._get_lr(group, inner.state[group["params"][0]])
        return 1.0, size.detach().clone() if isinstance(size, torch.Tensor) else float(size)
    d = group.get("d", 1.0)
    return float(group["lr"]), d.detach().clone() if isinstance(d, torch.Tensor) else float(d)


def effective_lrs(factors: list[tuple[float, torch.Tensor | float]]) -> list[float]:
    """d * lr per step, as kohya logs it, fetching all device values in one transfer."""
    on_device = [d for _, d in factors if isinstance(d, torch.Tensor)]
    fetched = iter(torch.stack(on_device).cpu().tolist() if on_device else [])
    return [lr * (next(fetched) if isinstance(d, torch.Tensor) else d) for lr, d in factors]
