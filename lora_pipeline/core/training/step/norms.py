"""Normalisation layers of a frozen half-precision U-Net, run in its own precision instead of float32.

Under autocast, `group_norm` and `layer_norm` are on PyTorch's float32 list: each of the U-Net's ~60 GroupNorms
and ~50 LayerNorms (SD 1.5) reads a bf16 activation, writes a float32 copy of it, and the next convolution or
matmul casts that back to bf16: two extra passes over every normalised activation, forward and backward. With
the frozen weights already in bf16 (or fp16), the norm can take the bf16 input directly: PyTorch's CUDA kernels
compute the mean and variance in float32 either way (their accumulation type), so what changes is only that the
output is rounded to bf16 once, where the next layer would round it anyway. kohya's `--full_bf16` runs the whole
U-Net so; here it is only the norms, the rest stays under autocast.
"""

from __future__ import annotations

import functools

import torch

NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


def norms_in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Run every frozen GroupNorm / LayerNorm of `module` in `dtype` (bf16 or fp16) outside autocast; returns how
    many. Norms with trainable or other-dtype weights keep autocast's float32."""
    patched = 0
    for norm in module.modules():
        if not isinstance(norm, NORMS):
            continue
        weights = [p for p in norm.parameters(recurse=False)]
        if any(p.requires_grad or p.dtype != dtype for p in weights):
            continue
        norm.forward = functools.partial(_forward_in, norm, dtype)
        patched += 1
    return patched


def _forward_in(norm: torch.nn.Module, dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return type(norm).forward(norm, x.to(dtype))
