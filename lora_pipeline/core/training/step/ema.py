"""EMA of the LoRA weights (`use_ema`): a float32 shadow of every trained LoRA parameter, updated after each
optimizer step, that the epoch and step files (and the samples) hold instead of the raw weights.

The decay follows diffusers' `EMAModel.get_decay` (SimpleTuner's EMA is diffusers'): at optimizer step s (1-based),
n = max(0, s - ema_update_after_step - 1); n = 0 copies the weights (decay 0); otherwise the decay is
(1 + n) / (10 + n), or with `ema_warmup` 1 - (1 + n)^-ema_power (inv_gamma 1), at most `ema_decay`. The update
is shadow += (1 - decay) * (weights - shadow), torch's EMA of several tensors (one foreach lerp on the
weights' device).

The update runs after the step, outside it: on the fast path the captured graph updates the weights in place and
the EMA reads them after each replay, so the fast path takes EMA as it is (its decay is a host float; nothing is
read back). In several processes (DDP) every process holds the same weights, so each keeps the same shadow.
The shadow is part of the resume state (checkpoint.py), so a resumed run ends with the same files.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from lora_pipeline.core.training.recipe_groups import EmaSettings


class LoraEma:
    """The shadow of `params` ({name: parameter}, the trainer's `trainable`), float32 on their device."""

    def __init__(self, settings: EmaSettings, params: Mapping[str, torch.nn.Parameter],
                 restored: Mapping[str, torch.Tensor] | None = None) -> None:
        self.settings = settings
        self.params = dict(params)
        with torch.no_grad():
            self.shadow = {n: p.detach().to(torch.float32, copy=True) for n, p in self.params.items()}
            if restored is not None:
                if set(restored) != set(self.shadow):
                    raise ValueError("the resume state's EMA does not hold the run's LoRA parameters")
                for name, tensor in restored.items():
                    self.shadow[name].copy_(tensor)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the shadow toward the weights after optimizer step `step` (1-based)."""
        names = list(self.params)
        # torch's foreach lerp: shadow + (1 - decay)(weights - shadow), exactly the weights at decay 0
        get_ema_multi_avg_fn(self.settings.decay(step))([self.shadow[n] for n in names],
                                                        [self.params[n].detach().float() for n in names], None)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The parameters hold the shadow inside the block (to save or sample), their own weights after it."""
        with torch.no_grad():
            kept = {n: p.detach().clone() for n, p in self.params.items()}
            for name, param in self.params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(kept[name])


@contextmanager
def ema_applied(ema: LoraEma | None) -> Iterator[None]:
    """`ema.applied()`, or nothing without an EMA."""
    if ema is None:
        yield
        return
    with ema.applied():
        yield
