"""A LoRA Linear's forward and backward in the fewest passes over its activations.

peft computes `base(x) + lora_B(lora_A(x)) * scaling` as four results the size of the layer's output: the base
matmul's, lora_B's, the scaled copy, and the sum; the backward adds two more (the scaled gradient, and the sum of
the base's and the LoRA's input gradients). The matmuls of the rank-r branch are small; those full-size passes are
not: at FLUX.1's 4,608 tokens they are the bulk of the elementwise work around its ~500 LoRA layers.

Here the branch's scaling is applied to the small (tokens x rank) tensor, and the base matmul accumulates into the
branch's output (`addmm_`, beta = 1: cuBLAS reads it in its epilogue), so the output is written twice and read
once; in the backward the input gradient of the base accumulates into the branch's the same way. Mathematically
the same function; the bf16 result differs from peft's only in rounding (one rounding of the sum instead of three),
which the tests bound.

Only what this covers is replaced, per call: a plain peft LoRA on an nn.Linear whose frozen weights are in the
compute dtype (autocast's, else the input's), one active adapter, no dropout, no hooks on its down projection
(kohya's network/rank/module dropout, kohya/dropout.py), not merged, not disabled. Anything else (DoRA, fp8 storage,
a block-swapped weight on the CPU, the evaluation's adapter switching) takes peft's own forward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + scale * (x A^T) B^T, with W and b frozen (no gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                up: torch.Tensor, scale: float) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        low = torch.mm(flat, down.t())
        if scale != 1.0:
            low = low * scale
        out = torch.mm(low, up.t()) if bias is None else torch.addmm(bias, low, up.t())
        out.addmm_(flat, weight.t())
        ctx.save_for_backward(flat, low, weight, down, up)
        ctx.scale, ctx.input_shape = scale, x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, low, weight, down, up = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        grad_up = torch.mm(grad.t(), low) if ctx.needs_input_grad[4] else None
        grad_low = torch.mm(grad, up)
        if ctx.scale != 1.0:
            grad_low = grad_low * ctx.scale
        grad_down = torch.mm(grad_low.t(), flat) if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_low, down).addmm_(grad, weight).view(ctx.input_shape)
        return grad_x, None, None, grad_down, grad_up, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor,
                up: torch.Tensor, scale: float) -> torch.Tensor:
    """`x W^T + b + scale * (x down^T) up^T` for a frozen W (and b), in W's dtype; `down` and `up` (the trained
    LoRA weights, float32 or not) are cast to it, their gradients flowing back in their own dtype."""
    dtype = weight.dtype
    with torch.autocast(x.device.type, enabled=False):
        return _LoraLinear.apply(x.to(dtype), weight, bias, down.to(dtype), up.to(dtype), scale)


def fuse_lora_linears(module: torch.nn.Module) -> int:
    """Route `module`'s plain peft LoRA Linears through `lora_linear` whenever a call allows it (module docstring);
    returns how many layers may take it."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    fused = 0
    for layer in module.modules():
        if type(layer) is LoraLinear and type(layer.get_base_layer()) is torch.nn.Linear:
            layer.forward = functools.partial(_forward, layer)
            fused += 1
    return fused


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapter = _single_plain_adapter(layer)
    base = layer.get_base_layer()
    if (adapter is None or args or kwargs or base._forward_hooks or base._forward_pre_hooks
            or "forward" in vars(base) or base.weight.requires_grad or base.weight.dtype != _compute_dtype(x)
            or base.weight.device != x.device):
        return type(layer).forward(layer, x, *args, **kwargs)
    return lora_linear(x, base.weight, base.bias, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
                       layer.scaling[adapter])


def _single_plain_adapter(layer: Any) -> str | None:
    """The one active adapter when it is a plain LoRA without dropout or hooks and the layer is neither merged nor
    disabled; None otherwise."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A or adapter in layer.lora_variant:
        return None
    down = layer.lora_A[adapter]
    if (not isinstance(layer.lora_dropout[adapter], torch.nn.Identity) or down._forward_hooks
            or down._forward_pre_hooks or layer.lora_B[adapter]._forward_hooks):
        return None
    return adapter
