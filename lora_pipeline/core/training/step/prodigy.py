"""Prodigy with its state on the device: no host synchronisation, capturable in the fast path's CUDA graph.

Numerically the algorithm of `prodigyopt.Prodigy` (Mishchenko & Defazio, 2023) with every option kohya passes
(decouple, use_bias_correction, safeguard_warmup, d0, d_coef, growth_rate, slice_p, beta3). The reference keeps
d, d_max, the running numerator and the step count k as Python floats and calls `.item()` twice per tensor
(768 device synchronisations per step for a rank-32 SD1.5 LoRA), and its `p.any()` picks the state's layout on the
host; a CUDA graph can hold none of that. Here d, d_max, d_numerator, d_hat, d_denom and k are 0-dim float32 /
int64 tensors updated in place, the per-tensor work is fused foreach launches (foreach.py), and the reference's
host branches become `torch.where` on the device:

- `group_lr > 0` (the reference skips the statistics, and so the step, at learning rate 0, e.g. the first step of
  a warm-up schedule): the moments decay by 1 and add 0 then, the step is multiplied by 0;
- `d_denom == 0` (every gradient zero, or lr 0): no d update and no step, as the reference's early return;
- `d == d0` (the first growth): `torch.where`.

The differences from the reference are summation order and precision only: the reference sums the per-tensor
numerator and denominator terms in Python's float64, here they are float32 device reductions, and the update is
`p -= dlr * (exp_avg / denom)` rather than one addcdiv. lora_pipeline_tests/test_prodigy.py checks the updates
against `prodigyopt.Prodigy` step by step (relative 1e-5 on d and the weights). As the reference, every parameter
group shares one d and one learning rate (groups may differ only in lr 0, which freezes them; here they must be
equal: the trainer's groups are the U-Net's and the text encoders' of kohya's text_encoder_lr).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from lora_pipeline.core.training.step import foreach

_SCALARS = ("d", "d_max", "d_numerator", "d_hat", "d_denom")


class Prodigy(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = float("inf"),
        slice_p: int = 1,
    ) -> None:
        if min(d0, lr, eps) <= 0.0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid Prodigy arguments: lr={lr}, betas={betas}, eps={eps}, d0={d0}")
        defaults = dict(lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay, decouple=decouple,
                        use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup, d0=d0,
                        d_coef=d_coef, growth_rate=growth_rate, slice_p=slice_p)
        super().__init__(params, defaults)
        if len({float(g["lr"]) for g in self.param_groups}) > 1:
            raise ValueError("Prodigy here takes one learning rate for all parameter groups (its d is shared)")
        device = self.param_groups[0]["params"][0].device
        shared = {name: torch.tensor(d0 if name in ("d", "d_max", "d_hat") else 0.0, device=device)
                  for name in _SCALARS}
        shared["k"] = torch.zeros((), dtype=torch.int64, device=device)
        for group in self.param_groups:  # one d for all groups, as the reference writes it into each
            group.update(shared)

    def _device_scalars(self) -> dict[str, torch.Tensor]:
        """The shared scalars as tensors on the parameters' device, one object for all groups (a resume state holds
        them on the CPU, one copy per group, or, written by prodigyopt's Prodigy, as Python numbers)."""
        group = self.param_groups[0]
        device = group["params"][0].device
        for name in (*_SCALARS, "k"):
            value = group[name]
            if not isinstance(value, torch.Tensor):
                dtype = torch.int64 if name == "k" else torch.float32
                value = torch.tensor(value, dtype=dtype, device=device)
            elif value.device != device:  # a resume state is read onto the CPU (checkpoint.load_state)
                value = value.to(device)
            for other in self.param_groups:
                other[name] = value
        return {name: group[name] for name in (*_SCALARS, "k")}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        group = self.param_groups[0]
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return loss
        scalars = self._device_scalars()
        d, k = scalars["d"], scalars["k"]
        beta1, beta2 = group["betas"]
        beta3 = group["beta3"] if group["beta3"] is not None else math.sqrt(beta2)
        decay, decouple, eps, d0 = group["weight_decay"], group["decouple"], group["eps"], group["d0"]
        slice_p = group["slice_p"]
        lr = group["lr"]  # a float, or the fast path's device tensor
        active = lr > 0.0  # a bool, or a device tensor under the fast path: no host read either way
        if group["use_bias_correction"]:
            steps = (k + 1).to(torch.float32)
            bias_correction = (1 - beta2**steps) ** 0.5 / (1 - beta1**steps)
            dlr = d * lr * bias_correction
        else:
            dlr = d * lr

        grads = [p.grad for p in params]
        if decay != 0 and not decouple:
            foreach.add_(grads, params, alpha=decay)
        states = [self.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if "s" in state:
                _from_reference(state, p, slice_p)
            else:
                state["s"] = torch.zeros_like(p.flatten()[::slice_p])
                state["p0"] = p.flatten()[::slice_p].clone()  # the reference's scalar 0 for a zero tensor: same math
                if beta1 > 0:
                    state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] = torch.zeros((), dtype=torch.int64, device=p.device)
        sliced = [g.flatten()[::slice_p] for g in grads]
        s = [st["s"] for st in states]
        exp_avg_sq = [st["exp_avg_sq"] for st in states]

        # statistics of this step (all zero where lr is 0, as the reference skips them)
        gate = _where(active, 1.0, 0.0)
        delta = foreach.sub([st["p0"] for st in states], [p.flatten()[::slice_p] for p in params])
        delta_numerator = (d / d0) * dlr * foreach.dot(sliced, delta) * gate
        if beta1 > 0:
            exp_avg = [st["exp_avg"] for st in states]
            foreach.mul_(exp_avg, _where(active, beta1, 1.0))
            foreach.add_(exp_avg, foreach.mul(grads, d * (1 - beta1) * gate))
        foreach.mul_(exp_avg_sq, _where(active, beta2, 1.0))
        foreach.add_(exp_avg_sq, foreach.mul(foreach.mul(grads, grads),
                                                          d * d * (1 - beta2) * gate))
        foreach.mul_(s, _where(active, beta3, 1.0))
        s_rate = (d / d0) * (d if group["safeguard_warmup"] else dlr) * gate
        foreach.add_(s, foreach.mul(sliced, s_rate))
        d_denom = torch.stack(foreach.norm(s, 1)).sum() * gate

        # d's update, skipped where the reference returns early (d_denom == 0)
        progressed = d_denom > 0
        numerator = scalars["d_numerator"] * beta3 + delta_numerator
        d_hat = group["d_coef"] * numerator / torch.where(progressed, d_denom, 1.0)
        grown = torch.where(d == d0, torch.maximum(d, d_hat), d)
        d_max = torch.maximum(scalars["d_max"], d_hat)
        d_new = torch.minimum(d_max, grown * group["growth_rate"])
        for name, value in (("d_numerator", numerator), ("d_denom", d_denom), ("d_hat", d_hat), ("d_max", d_max)):
            scalars[name].copy_(torch.where(progressed, value, scalars[name]))
        scalars["d"].copy_(torch.where(progressed, d_new, d))  # the same tensor as `d`: read after, the new one

        # the step with the new d in the denominator and the step size of the old one (dlr), as the reference
        denom = foreach.sqrt(exp_avg_sq)
        foreach.add_tensor_(denom, d * eps)
        step_size = dlr * progressed.to(torch.float32)
        if decay != 0 and decouple:
            foreach.add_(params, foreach.mul(params, -decay * step_size))
        if beta1 > 0:
            update = foreach.div([st["exp_avg"] for st in states], denom)
            foreach.mul_(update, step_size)
        else:
            update = foreach.div(grads, denom)
            foreach.mul_(update, step_size * d)
        foreach.sub_(params, update)
        taken = progressed.to(torch.int64)
        foreach.add_([st["step"] for st in states], [taken] * len(states))
        k.add_(taken)
        return loss


def _where(condition: bool | torch.Tensor, a: float, b: float) -> float | torch.Tensor:
    """`a` where `condition` holds, else `b`: a Python number for a Python condition, a device tensor for a tensor."""
    if isinstance(condition, torch.Tensor):
        return torch.where(condition, a, b)
    return a if condition else b


def _from_reference(state: dict[str, Any], p: torch.Tensor, slice_p: int) -> None:
    """A resume state written by prodigyopt's Prodigy in this layout: its step count on the device, and its p0 of a
    parameter that started at zero (a scalar 0 there) as zeros of the sliced parameter's shape."""
    if not isinstance(state["step"], torch.Tensor):
        state["step"] = torch.tensor(state["step"], dtype=torch.int64, device=p.device)
    shape = p.flatten()[::slice_p].shape
    if state["p0"].shape != shape:
        state["p0"] = torch.zeros(shape, dtype=p.dtype, device=p.device) + state["p0"]
