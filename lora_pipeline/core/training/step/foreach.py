"""torch's fused per-tensor-list kernels (`torch._foreach_*`, private to torch) for the device-side optimizers
(dadapt.py, prodigy.py): each call is one launch over every LoRA tensor, where a Python loop would launch one kernel
per tensor. The one module of the project that takes these private names (lora_pipeline_tests/test_layout.py)."""

from __future__ import annotations

import torch

add_ = torch._foreach_add_
addcmul_ = torch._foreach_addcmul_
div = torch._foreach_div
mul = torch._foreach_mul
mul_ = torch._foreach_mul_
norm = torch._foreach_norm
sqrt = torch._foreach_sqrt
sub = torch._foreach_sub
sub_ = torch._foreach_sub_


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """sum_i <a_i, b_i> as one reduction over the concatenated products."""
    return torch.cat([x.reshape(-1) for x in mul(a, b)]).sum()
