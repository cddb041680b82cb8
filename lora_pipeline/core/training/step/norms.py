"""Normalisation layers of a frozen half-precision U-Net, run in its own precision instead of float32.

Under autocast, `group_norm` and `layer_norm` are on PyTorch's float32 list: each of the U-Net's ~60 GroupNorms
and ~50 LayerNorms (SD 1.5) reads a bf16 activation, writes a float32 copy of it, and the next convolution or
matmul casts that back to bf16: two extra passes over every normalised activation, forward and backward. With
the frozen weights already in bf16 (or fp16), the norm can take the bf16 input directly: PyTorch's CUDA kernels
compute the mean and variance in float32 either way (their accumulation type), so what changes is only that the
output is rounded to bf16 once, where the next layer would round it anyway. kohya's `--full_bf16` runs the whole
U-Net so; here it is only the norms, the rest stays under autocast.

The other round trip is peft's: a LoRA layer casts its input to its weights' dtype before the down projection,
so with float32 LoRA weights (kept so for the optimizer) every LoRA'd layer's bf16 input is copied to float32, and
autocast then casts it back to bf16 for the matmul; the gradient takes the same two copies back. At FLUX.1's size
those copies were 9.8% of the step's GPU time (H100 profile, benchmarks/RESULTS.md). `lora_inputs_uncast` turns
the cast off where autocast is on: the bf16 values go into the same bf16 matmul, so the result is unchanged.
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


def lora_inputs_uncast(module: torch.nn.Module) -> int:
    """Leave the inputs of `module`'s peft LoRA layers in their dtype (autocast casts them for the matmul, as it
    would the float32 copy); returns how many layers. DoRA layers keep the cast: their norm arithmetic runs
    outside the matmuls, in the weights' dtype."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    uncast = 0
    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer) and not any(getattr(layer, "use_dora", {}).values()):
            layer.cast_input_dtype_enabled = False
            uncast += 1
    return uncast


def _forward_in(norm: torch.nn.Module, dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return type(norm).forward(norm, x.to(dtype))
