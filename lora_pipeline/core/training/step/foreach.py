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


def add_tensor_(tensors: list[torch.Tensor], value: torch.Tensor) -> None:
    """tensors[i] += value for a 0-dim device tensor, with no host read. Passed positionally, torch's argument parser
    matches a 0-dim tensor to the Scalar overload first and reads it back (`.item()`: a sync, which a CUDA graph
    capture refuses: cudaErrorStreamCaptureUnsupported); named `other`, it takes the Tensor overload."""
    torch._foreach_add_(tensors, other=value)


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """sum_i <a_i, b_i> as one reduction over the concatenated products."""
    return torch.cat([x.reshape(-1) for x in mul(a, b)]).sum()
