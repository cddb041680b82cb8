"""step/prodigy.py's device-side Prodigy against prodigyopt's reference, step by step (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lora_pipeline.core.training.step.prodigy import Prodigy

# float32 device reductions against the reference's float64 Python sums: a relative 1e-5 covers the summation order
# over these sizes (the observed differences are ~1e-7) and is far below any effect of an option.
RTOL, ATOL = 1e-5, 1e-9


def _params() -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(8, 16, generator=generator)),
            torch.nn.Parameter(torch.zeros(16, 4))]  # a LoRA up matrix starts at zero (the reference's scalar p0)


def _grads(step: int) -> list[torch.Tensor]:
    """A steady direction (so that d grows) plus per-step noise."""
    steady, noise = torch.Generator().manual_seed(100), torch.Generator().manual_seed(200 + step)
    return [torch.randn(*shape, generator=steady) + 0.3 * torch.randn(*shape, generator=noise)
            for shape in ((8, 16), (16, 4))]


@pytest.mark.parametrize("options", [
    {},
    {"weight_decay": 0.1, "use_bias_correction": True, "safeguard_warmup": True, "d_coef": 2.0},
    {"weight_decay": 0.1, "decouple": False, "betas": (0.0, 0.99), "growth_rate": 1.5, "slice_p": 3},
])
def test_prodigy_follows_the_reference_with_lr_zero_and_zero_gradient_steps(options):
    import prodigyopt

    mine, theirs = _params(), _params()
    ours = Prodigy(mine, lr=1.0, **options)
    reference = prodigyopt.Prodigy(theirs, lr=1.0, **options)
    lrs = [0.0, 0.5, 1.0, 1.0, 1.0, 0.7]  # a warm-up's first step at lr 0: no statistics, no step
    for step, lr in enumerate(lrs):
        grads = [torch.zeros_like(g) for g in _grads(step)] if step == 3 else _grads(step)  # step 3: all zero
        for optimizer, params in ((ours, mine), (reference, theirs)):
            for group in optimizer.param_groups:
                group["lr"] = lr
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
        group, ref_group = ours.param_groups[0], reference.param_groups[0]
        assert int(group["k"]) == ref_group["k"]
        assert float(group["d"]) == pytest.approx(ref_group["d"], rel=RTOL)
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=RTOL, atol=ATOL)
    assert int(ours.param_groups[0]["k"]) == 5  # the lr-0 step took none (at zero gradients s still counts)
    if not options:  # d grew: the comparison saw adaptation (the damped options need more steps)
        assert float(ours.param_groups[0]["d"]) > 1e-6


def test_prodigy_resumes_from_a_reference_state():
    import prodigyopt

    theirs = _params()
    reference = prodigyopt.Prodigy(theirs, lr=1.0)
    for step in range(2):
        for p, g in zip(theirs, _grads(step), strict=True):
            p.grad = g
        reference.step()
    mine = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    ours = Prodigy(mine, lr=1.0)
    ours.load_state_dict(copy.deepcopy(reference.state_dict()))  # not sharing the reference's state tensors
    for optimizer, params in ((ours, mine), (reference, theirs)):
        for p, g in zip(params, _grads(2), strict=True):
            p.grad = g.clone()
        optimizer.step()
    assert isinstance(ours.param_groups[0]["d"], torch.Tensor)
    assert float(ours.param_groups[0]["d"]) == pytest.approx(reference.param_groups[0]["d"], rel=RTOL)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=RTOL, atol=ATOL)


def test_sync_free_adamw8bit_equals_bitsandbytes_byte_for_byte():
    import bitsandbytes

    from lora_pipeline.core.training.step.adamw8bit import AdamW8bit

    mine, theirs = _params(), _params()
    ours, reference = (AdamW8bit(mine, lr=1e-2, min_8bit_size=0),
                       bitsandbytes.optim.AdamW8bit(theirs, lr=1e-2, min_8bit_size=0))
    for step in range(3):
        for optimizer, params in ((ours, mine), (reference, theirs)):
            for p, g in zip(params, _grads(step), strict=True):
                p.grad = g
            optimizer.step()
    for a, b in zip(mine, theirs, strict=True):
        assert torch.equal(a, b) and not torch.equal(a, _params()[0] if a.shape == (8, 16) else _params()[1])
    assert torch.equal(ours.state[mine[0]]["state1"], reference.state[theirs[0]]["state1"])


def test_prodigy_resumed_from_its_own_state_continues_byte_for_byte():
    whole, cut = _params(), _params()
    uninterrupted, first = Prodigy(whole, lr=1.0), Prodigy(cut, lr=1.0)
    for step in range(3):
        for optimizer, params in ((uninterrupted, whole), (first, cut)):
            if optimizer is first and step == 2:
                continue
            for p, g in zip(params, _grads(step), strict=True):
                p.grad = g.clone()
            optimizer.step()
    saved = copy.deepcopy(first.state_dict())  # as checkpoint.py writes and reads it
    resumed = Prodigy(cut, lr=1.0)
    resumed.load_state_dict(saved)
    for p, g in zip(cut, _grads(2), strict=True):
        p.grad = g.clone()
    resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(whole, cut, strict=True))
    assert torch.equal(resumed.param_groups[0]["d"], uninterrupted.param_groups[0]["d"])


class _NoHostReads(TorchDispatchMode):
    """Fails on any read of a tensor's value back to the host (`.item()`, `float(t)`, a tensor used as a Python
    number): on CUDA each is a sync, which a graph capture refuses (cudaErrorStreamCaptureUnsupported)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func is not torch.ops.aten._local_scalar_dense.default, "the step read a tensor back to the host"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("optimizer", [
    "Prodigy", "Prodigy-options", "DAdaptAdamW",
])
def test_a_step_with_the_fast_paths_learning_rate_tensor_reads_nothing_back_to_the_host(optimizer):
    """Under the fast path each group's lr is a device tensor (fastpath.GraphedSteps.lrs). Prodigy's eps term was
    once added positionally (`_foreach_add_(denom, d * eps)`), which torch parses as a Python number: the capture
    failed on the H100 and this test failed on the CPU."""
    from lora_pipeline.core.training.step.dadapt import DAdaptAdamW

    params = _params()
    if optimizer == "DAdaptAdamW":
        opt = DAdaptAdamW(params, lr=1.0, weight_decay=0.01)
    else:
        opt = Prodigy(params, lr=1.0, **({"weight_decay": 0.1, "use_bias_correction": True, "d_coef": 2.0}
                                         if optimizer == "Prodigy-options" else {}))
    for step in range(3):
        for group in opt.param_groups:
            group["lr"] = torch.tensor(1.0)
        for p, g in zip(params, _grads(step), strict=True):
            p.grad = g.clone()
        with _NoHostReads():
            opt.step()
    assert not torch.equal(params[1].detach(), torch.zeros(16, 4))  # the steps moved the parameters
