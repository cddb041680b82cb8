"""DAdaptAdamW with foreach kernels and no host synchronisation.

Numerically the algorithm of `dadaptation.DAdaptAdam(decouple=True)` (Defazio & Mishchenko, 2023) with its
defaults (no bias correction, growth_rate inf, layer_scale 1), which kohya's `--optimizer_type DAdaptAdam`
runs. The reference implementation loops over parameters in Python and calls `.item()` twice per tensor:
768 device synchronisations per step for a rank-32 SD1.5 LoRA, which left an H100 idle most of each step
(measured: 135 ms of CPU per step in the optimizer alone). Here `d` and the running numerator stay on the
device as 0-dim tensors and every per-tensor operation is one fused foreach launch (foreach.py). A unit test
checks the updates against `dadaptation.DAdaptAdam` step by step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lora_pipeline.core.training.step import foreach


class DAdaptAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        d0: float = 1e-6,
        growth_rate: float = float("inf"),
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, d0=d0, growth_rate=growth_rate, k=0)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("DAdaptAdamW here takes one parameter group")
        group = self.param_groups[0]
        device = group["params"][0].device
        group["d"] = torch.tensor(d0, dtype=torch.float32, device=device)
        group["numerator_weighted"] = torch.zeros((), dtype=torch.float32, device=device)
        group["k"] = torch.zeros((), dtype=torch.int64, device=device)  # steps taken, counted on the device

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: C901 - one algorithm, kept in the reference's order
        loss = closure() if closure is not None else None
        group = self.param_groups[0]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        beta1, beta2 = group["betas"]
        sqrt_beta2 = beta2**0.5
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if not state:
                state["s"] = torch.zeros_like(p)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        s = [st["s"] for st in states]
        exp_avg = [st["exp_avg"] for st in states]
        exp_avg_sq = [st["exp_avg_sq"] for st in states]
        d = group["d"]
        dlr = d * lr  # 0-dim tensor on the device: no synchronisation

        denom = foreach.sqrt(exp_avg_sq)
        foreach.add_(denom, eps)
        ratio = foreach.div(s, denom)
        numerator_acum = dlr * foreach.dot(grads, ratio)

        foreach.mul_(exp_avg, beta1)
        scaled = foreach.mul(grads, dlr * (1 - beta1))
        foreach.add_(exp_avg, scaled)
        foreach.mul_(exp_avg_sq, beta2)
        foreach.addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
        foreach.mul_(s, sqrt_beta2)
        scaled = foreach.mul(grads, dlr * (1 - sqrt_beta2))
        foreach.add_(s, scaled)
        sk_l1 = torch.stack(foreach.norm(s, 1)).sum()

        # The reference returns early when every gradient is zero (sk_l1 == 0): no d update, no step; and it
        # adapts d only while lr > 0 (lr may be a device tensor: the fast path's captured step reads it so).
        progressed = sk_l1 > 0
        numerator_weighted = sqrt_beta2 * group["numerator_weighted"] + (1 - sqrt_beta2) * numerator_acum
        d_hat = numerator_weighted / ((1 - sqrt_beta2) * torch.where(progressed, sk_l1, 1.0))
        d_new = torch.maximum(d, torch.minimum(d_hat, d * group["growth_rate"]))
        # Updated in place, so a captured step's replay reads the value the previous step wrote.
        group["numerator_weighted"].copy_(torch.where(progressed, numerator_weighted, group["numerator_weighted"]))
        d.copy_(torch.where(progressed & (lr > 0.0), d_new, d))

        denom = foreach.sqrt(exp_avg_sq)
        foreach.add_(denom, eps)
        step = foreach.div(exp_avg, denom)
        if decay != 0:
            foreach.add_(step, foreach.mul(params, decay * dlr))
        foreach.mul_(step, progressed.to(params[0].dtype))
        foreach.sub_(params, step)
        if isinstance(group["k"], torch.Tensor):
            group["k"].add_(1)
        else:  # a resume state written before k moved to the device
            group["k"] += 1
        return loss
