"""kohya's loss functions (train_util.conditional_loss) and the Huber threshold per timestep
(train_util.get_huber_threshold_if_needed), element-wise: the callers mask, average and weight as before.

- l2: (pred - target)^2; l1: |pred - target|.
- huber: 2c(sqrt(r^2 + c^2) - c), about r^2 for residuals r much smaller than c (so, for small residuals, what l2
  gives) and 2c|r| for large ones; smooth_l1: 2(sqrt(r^2 + c^2) - c), the same divided by c.
- The threshold c of timestep t (of `num_train_timesteps`): "snr": (1 - huber_c) / (1 + sigma_t)^2 + huber_c with
  sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), DDPM only (as kohya, huber_scale does not apply);
  "exponential": huber_scale * huber_c^(t / num_train_timesteps); "constant": huber_scale * huber_c.

Device math only (the timesteps and alpha_bar on the step's device): a captured step (fastpath.py) holds it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lora_pipeline.core.training.recipe_groups import NoiseSettings


def huber_threshold(settings: NoiseSettings, timesteps: torch.Tensor, num_train_timesteps: int,
                    alphas_cumprod: torch.Tensor | None) -> torch.Tensor | None:
    """c per image (b,) for huber and smooth_l1 (None for l2 and l1); `timesteps` may be fractional (FLUX.1's
    sigma x 1000); `alphas_cumprod` is the DDPM schedule's (None for the flow objective, where "snr" is refused)."""
    if settings.loss_type not in ("huber", "smooth_l1"):
        return None
    t = timesteps.float()
    if settings.huber_schedule == "snr":
        if alphas_cumprod is None:
            raise ValueError("huber_schedule snr needs a DDPM noise schedule")
        alpha_bar = alphas_cumprod.to(timesteps.device, torch.float32)[timesteps.long()]
        sigmas = ((1.0 - alpha_bar) / alpha_bar) ** 0.5
        return (1 - settings.huber_c) / (1 + sigmas) ** 2 + settings.huber_c
    if settings.huber_schedule == "exponential":
        alpha = -math.log(settings.huber_c) / num_train_timesteps
        return torch.exp(-alpha * t) * settings.huber_scale
    return torch.full_like(t, settings.huber_c * settings.huber_scale)


def conditional_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | None) -> torch.Tensor:
    """The element-wise loss of `loss_type` (kohya's conditional_loss with reduction "none"); `huber_c` (b,) from
    `huber_threshold` for huber and smooth_l1."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type} needs the Huber threshold")
    c = huber_c.view(-1, *([1] * (pred.ndim - 1)))
    smooth = 2 * (torch.sqrt((pred - target) ** 2 + c**2) - c)
    return smooth * c if loss_type == "huber" else smooth
