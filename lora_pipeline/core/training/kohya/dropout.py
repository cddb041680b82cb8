"""kohya's LoRA dropouts (networks/lora.py's LoRAModule.forward), on peft's LoRA layers:

- `network_dropout` (kohya's --network_dropout): neuron dropout on the LoRA down projection's output, scaled by
  1/(1 - p) (torch's dropout);
- `rank_dropout` (network_args rank_dropout): each rank of the down output zeroed with chance p per image, the
  survivors scaled by 1/(1 - p) ("as if the rank changed");
- `module_dropout` (network_args module_dropout): the whole LoRA of a module left out of a forward with chance p.

In that order, as kohya's, and only while training: a module in `eval()` or a forward without gradients (the
validation loss, sampling) is the plain LoRA. Implemented as a forward hook on each LoRA layer's down projection
(peft's `lora_A`) that edits its output, so the written file is the same layout as without dropout.

Departure: kohya draws from torch's global generators (module dropout on the CPU); here every mask comes from one
generator on the weights' device, reseeded at each step from (seed, step) (`reseed_dropout`), so a resumed run
draws what an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lora_pipeline.core.training.seeds import Stream, derive_seed

ATTRIBUTE = "_lora_dropout"  # where the model keeps its `LoraDropout`


@dataclass(frozen=True)
class DropoutSettings:
    network_dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None

    @property
    def on(self) -> bool:
        return any(p for p in (self.network_dropout, self.rank_dropout, self.module_dropout))


class LoraDropout:
    """The dropouts of one model's LoRA layers and the generator they draw from."""

    def __init__(self, settings: DropoutSettings, device: torch.device) -> None:
        self.settings = settings
        self.generator = torch.Generator(device=device)
        self.handles: list[Any] = []

    def reseed(self, seed: int, step: int) -> None:
        self.generator.manual_seed(derive_seed(seed, Stream.DROPOUT, step))

    def _rand(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if self.generator.device != like.device:  # the model moved after the hooks were added
            self.generator = torch.Generator(device=like.device).manual_seed(self.generator.initial_seed())
        return torch.rand(shape, generator=self.generator, device=like.device)

    def hook(self, module: torch.nn.Module, _args: Any, lx: torch.Tensor) -> torch.Tensor:
        """kohya's dropouts on the down projection's output `lx` (b, r), (b, tokens, r) or (b, r, h, w)."""
        if not module.training or not torch.is_grad_enabled():
            return lx
        s = self.settings
        if s.module_dropout:  # the LoRA's output is then up(0) = 0: the module's own output alone
            lx = lx * (self._rand((), lx) >= s.module_dropout).to(lx.dtype)
        if s.network_dropout:
            lx = lx * (self._rand(tuple(lx.shape), lx) >= s.network_dropout).to(lx.dtype) / (1 - s.network_dropout)
        if s.rank_dropout:
            rank_axis = 1 if lx.ndim in (2, 4) else lx.ndim - 1
            shape = [1] * lx.ndim
            shape[0], shape[rank_axis] = lx.shape[0], lx.shape[rank_axis]
            keep = (self._rand(tuple(shape), lx) > s.rank_dropout).to(lx.dtype)
            lx = lx * keep / (1 - s.rank_dropout)
        return lx


def add_dropout(models: list[torch.nn.Module], settings: DropoutSettings, adapter: str = "default"
                ) -> LoraDropout | None:
    """Hook the dropouts onto every LoRA layer of `models` (kept on the first model, `reseed_dropout` finds it)."""
    if not settings.on or not models:
        return None
    from peft.tuners.lora import LoraLayer

    device = next(models[0].parameters()).device
    dropout = LoraDropout(settings, device)
    for model in models:
        for module in model.modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                dropout.handles.append(module.lora_A[adapter].register_forward_hook(dropout.hook))
    setattr(models[0], ATTRIBUTE, dropout)
    return dropout


def reseed_dropout(model: torch.nn.Module, seed: int, step: int) -> None:
    """Seed the dropouts of `model` (or the model it wraps) for global step `step`; nothing without dropouts."""
    inner = getattr(model, "module", model)  # DDP's and accelerate's wrappers
    dropout = getattr(inner, ATTRIBUTE, None)
    if dropout is not None:
        dropout.reseed(seed, step)
