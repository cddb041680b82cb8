"""Optimizers and learning-rate schedules: each one steps, AdamW8bit keeps real 8-bit state, lr follows the schedule."""

from __future__ import annotations

import math

import pytest
import torch

from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline.core.training.recipe_fields import OPTIMIZERS, SCHEDULERS
from lora_pipeline.core.training.step.optim import effective_lrs, make_lr_scheduler, make_optimizer, step_lr

CPU = torch.device("cpu")


def _param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.linspace(-1, 1, 64).reshape(8, 8))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_takes_a_step(name):
    lr = 1.0 if name in ("DAdaptAdamW", "Prodigy") else 1e-2
    param = _param()
    before = param.detach().clone()
    recipe = Recipe(name="r", base_model="tiny-sd", optimizer=name, learning_rate=lr)
    optimizer = make_optimizer(recipe.optimizer_settings, recipe.schedule, [param], CPU)
    factors = []
    for _ in range(3):
        param.grad = torch.ones_like(param)
        optimizer.step()
        factors.append(step_lr(optimizer))
    assert not torch.equal(param.detach(), before)
    lrs = effective_lrs(factors)
    assert all(lr > 0 for lr in lrs)
    if name == "DAdaptAdamW":  # d is a device tensor copied per step: each step keeps its own value
        assert lrs[0] < lrs[-1] == lr * float(optimizer.param_groups[0]["d"])
    state = optimizer.state[param]
    if name == "AdamW8bit":
        assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
        assert state["state1"].shape == param.shape
    if name in ("DAdaptAdamW", "Prodigy"):
        assert optimizer.param_groups[0]["d"] > 1e-6  # the step size adapted from its d0


def _lrs(scheduler_name: str, warmup: int, total: int) -> list[float]:
    param = _param()
    recipe = Recipe(name="r", base_model="tiny-sd", optimizer="AdamW", learning_rate=0.1, lr_scheduler=scheduler_name,
                    lr_warmup_steps=warmup)
    optimizer = make_optimizer(recipe.optimizer_settings, recipe.schedule, [param], CPU)
    scheduler = make_lr_scheduler(recipe.optimizer_settings, recipe.schedule, optimizer, total)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name", SCHEDULERS)
def test_lr_follows_the_schedule(name):
    total, warmup = 20, 4
    lrs = _lrs(name, warmup, total)
    if name == "constant":
        expected = [0.1] * total
    elif name == "constant_with_warmup":
        expected = [0.1 * min(1.0, s / warmup) for s in range(total)]
    elif name == "linear":
        expected = [0.1 * (s / warmup if s < warmup else (total - s) / (total - warmup)) for s in range(total)]
    elif name == "polynomial":  # diffusers' default end lr 1e-7, power 1 (lr_scheduler_power)
        expected = [0.1 * s / warmup if s < warmup else (0.1 - 1e-7) * (total - s) / (total - warmup) + 1e-7
                    for s in range(total)]
    else:  # cosine; cosine_with_restarts with its default single cycle
        expected = [
            0.1 * (s / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
            for s in range(total)
        ]
    assert lrs == pytest.approx(expected, abs=1e-9)


def test_foreach_dadapt_matches_the_reference_dadaptation():
    """Our sync-free DAdaptAdamW takes the same steps as dadaptation.DAdaptAdam(decouple=True)."""
    import dadaptation

    from lora_pipeline.core.training.step.dadapt import DAdaptAdamW

    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 8), (8, 4), (16,), (3, 3, 1, 1)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = DAdaptAdamW(ours, lr=1.0, weight_decay=0.01)
    opt_ref = dadaptation.DAdaptAdam(ref, lr=1.0, decouple=True, weight_decay=0.01)
    for _ in range(12):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, q, g in zip(ours, ref, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_ref.step()
        assert float(opt_ours.param_groups[0]["d"]) == pytest.approx(opt_ref.param_groups[0]["d"], rel=1e-5)
        for p, q in zip(ours, ref, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    assert float(opt_ours.param_groups[0]["d"]) > 1e-6  # d grew: the adaptation really ran
