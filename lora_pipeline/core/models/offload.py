"""Less GPU memory for a frozen denoiser: float8 weight storage (kohya's --fp8_base) and block swapping (kohya's
--blocks_to_swap, its ModelOffloader).

`store_linears_in_fp8` keeps every frozen nn.Linear's weight as float8_e4m3fn and computes in the input's (or
autocast's) dtype, upcasting the weight per forward; its backward keeps the fp8 weight, not an upcast copy, so
the saved activations do not hold a bf16 copy of every weight. Trainable LoRA layers (peft) are left alone.

`BlockSwap` keeps the frozen weights of some blocks in (pinned) CPU memory and gives them to the GPU just before
the block runs and takes them back after, in the forward and in the backward (with gradient checkpointing, also
around the recomputation). Only frozen parameters move: LoRA weights and their optimizer state stay on the
device. On a CPU the moves are no-ops but the same code runs, so results are identical.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

FP8 = torch.float8_e4m3fn


class _Fp8Matmul(torch.autograd.Function):
    """x @ w.T + b with w stored in float8: the backward upcasts w again instead of saving an upcast copy."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.input_dtype = dtype, x.dtype
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (weight,) = ctx.saved_tensors
        return (grad.to(ctx.dtype) @ weight.to(ctx.dtype)).to(ctx.input_dtype), None, None, None


class Fp8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is stored as float8_e4m3fn and upcast to the compute dtype per forward
    (autocast's dtype when autocast is on, else the dtype the weight had)."""

    compute_dtype: torch.dtype

    @classmethod
    def of(cls, linear: nn.Linear) -> Fp8Linear:
        fp8 = cls.__new__(cls)
        nn.Module.__init__(fp8)
        fp8.in_features, fp8.out_features = linear.in_features, linear.out_features
        fp8.compute_dtype = linear.weight.dtype
        fp8.weight = nn.Parameter(linear.weight.detach().to(FP8), requires_grad=False)
        fp8.bias = linear.bias
        return fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.compute_dtype
        with torch.autocast(device, enabled=False):
            return _Fp8Matmul.apply(x, self.weight, self.bias, dtype)


def store_linears_in_fp8(model: nn.Module) -> int:
    """Replace every frozen nn.Linear of `model` (peft's base layers included) by an Fp8Linear; how many."""
    frozen = [(name, module) for name, module in model.named_modules()
              if type(module) is nn.Linear and not module.weight.requires_grad]
    for name, linear in frozen:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, Fp8Linear.of(linear))
    return len(frozen)


class _Boundary(torch.autograd.Function):
    """Identity on a block's tensors whose backward calls `on_backward` once every gradient flowing through it
    has arrived: on the outputs, before the block's backward; on the inputs, after it."""

    @staticmethod
    def forward(ctx: Any, on_backward: Callable[[], None], anchor: torch.Tensor, *tensors: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        ctx.on_backward = on_backward
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        ctx.on_backward()
        return (None, None, *grads)


def _tensors(values: Iterable[Any]) -> list[int]:
    return [i for i, v in enumerate(values) if isinstance(v, torch.Tensor) and v.is_floating_point()]


class BlockSwap:
    """Keeps the frozen weights of `blocks` on the CPU except while each block runs (see the module docstring).

    `hooks` counts the moves in and out, for tests on a CPU where a move changes nothing.
    """

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device) -> None:
        self.device, self.hooks = device, {"in": 0, "out": 0}
        pin = device.type == "cuda"
        self._params = {}
        for block in blocks:
            frozen = [p for p in block.parameters() if not p.requires_grad]
            self._params[id(block)] = [(p, p.data.cpu().pin_memory() if pin else p.data.cpu()) for p in frozen]
            block.forward = functools.partial(self._forward, block, block.forward)
        self._in_backward: set[int] = set()

    @property
    def swapped(self) -> set[int]:
        """ids of the parameters that live on the CPU."""
        return {id(p) for params in self._params.values() for p, _ in params}

    def _move(self, key: int, to_device: bool) -> None:
        self.hooks["in" if to_device else "out"] += 1
        for param, cpu in self._params[key]:
            param.data = cpu.to(self.device, non_blocking=True) if to_device else cpu

    def _backward_starts(self, key: int) -> None:
        self._in_backward.add(key)
        self._move(key, True)

    def _backward_done(self, key: int) -> None:
        self._in_backward.discard(key)
        self._move(key, False)

    def _forward(self, block: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        key = id(block)
        if key not in self._in_backward:  # else its backward brought it already (a checkpoint recomputes)
            self._move(key, True)
        if not torch.is_grad_enabled():
            out = forward(*args, **kwargs)
        else:  # a checkpoint's recomputation too: it must save the tensors the first forward saved
            anchor = torch.ones((), device=self.device, requires_grad=True)  # puts the boundaries in the graph
            args, kwargs = self._through(functools.partial(self._backward_done, key), anchor, args, kwargs)
            out = forward(*args, **kwargs)
            single = not isinstance(out, tuple)
            passed, _ = self._through(functools.partial(self._backward_starts, key), anchor,
                                      (out,) if single else out, {})
            out = passed[0] if single else passed
        if key not in self._in_backward:  # not a checkpoint's recomputation, whose backward comes next
            self._move(key, False)
        return out

    @staticmethod
    def _through(on_backward: Callable[[], None], anchor: torch.Tensor, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """`args` and `kwargs` with their floating tensors passed through one _Boundary."""
        values = [*args, *kwargs.values()]
        picked = _tensors(values)
        if not picked:
            return args, kwargs
        passed = _Boundary.apply(on_backward, anchor, *(values[i] for i in picked))
        for i, tensor in zip(picked, passed, strict=True):
            values[i] = tensor
        return tuple(values[:len(args)]), dict(zip(kwargs, values[len(args):], strict=True))
