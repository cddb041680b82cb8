"""The rectified-flow objective of FLUX.1, drawn the way kohya's flux_train_network.py draws it.

The noisy latents are the straight line `(1 - sigma) * latents + sigma * noise` at a sigma in [0, 1], the model
predicts the velocity and the target is `noise - latents`. These functions follow kohya's
library/flux_train_utils.py (get_noisy_model_input_and_timesteps, apply_model_prediction_type, time_shift,
get_lin_function, get_sigmas) and the SD3 timestep densities and loss weights it shares with diffusers'
training_utils (compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, used here directly).
Every random number comes from the given generator, not kohya's global RNG, so a step is reproducible whatever
device the tensors then move to (core/training/seeds.py); with the generator seeded as kohya's global RNG, the
draws and results are kohya's (test_flow.py compares them with kohya's code, bit for bit).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from lora_pipeline.core.training.recipe_groups import (  # noqa: F401 (re-exported: the objective's settings)
    FlowSettings,
    PredictionType,
    TimestepSampling,
    WeightingScheme,
)
from lora_pipeline.core.training.step.loss import conditional_loss

# flux_shift's mu grows linearly from BASE_SHIFT at 256 image tokens to MAX_SHIFT at 4096 (kohya's get_lin_function)
BASE_SEQ_LEN, BASE_SHIFT, MAX_SEQ_LEN, MAX_SHIFT = 256, 0.5, 4096, 1.15


def flow_match_sigmas(settings: FlowSettings, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The sigmas of the training scheduler kohya makes (FlowMatchEulerDiscreteScheduler shifted by
    discrete_flow_shift), from 1 down to its smallest: what "sigma" sampling reads. Compute once per run."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps,
                                           shift=settings.discrete_flow_shift).sigmas


def time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    """kohya's (and FLUX.1's) time_shift: `e^mu / (e^mu + (1/t - 1)^sigma)`, pushing t towards 1 as mu grows."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def flux_shift_mu(image_seq_len: int) -> float:
    """kohya's get_lin_function(y1=0.5, y2=1.15) at the image's token count."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return slope * image_seq_len + (BASE_SHIFT - slope * BASE_SEQ_LEN)


def drawn_sigmas(batch: int, settings: FlowSettings, generator: torch.Generator, image_seq_len: int) -> torch.Tensor:
    """The sigmas of the "uniform", "sigmoid", "shift" and "flux_shift" modes (kohya's own draws of each), on the
    generator's device."""
    mode = settings.timestep_sampling
    if mode == "uniform":
        return torch.rand((batch,), generator=generator)
    sigmas = torch.sigmoid(settings.sigmoid_scale * torch.randn((batch,), generator=generator))
    if mode == "sigmoid":
        return sigmas
    if mode == "shift":
        shift = settings.discrete_flow_shift
        return (sigmas * shift) / (1 + (shift - 1) * sigmas)
    if mode == "flux_shift":
        return time_shift(flux_shift_mu(image_seq_len), 1.0, sigmas)
    raise ValueError(f"{mode!r} sigmas are read from the scheduler, not drawn")


def draw_sigmas(
    batch: int,
    settings: FlowSettings,
    generator: torch.Generator,
    image_seq_len: int,
    num_train_timesteps: int = 1000,
    scheduler_sigmas: torch.Tensor | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) of a batch, shaped (batch,), drawn as `noisy_input` draws them and moved to `device`
    (default: the generator's); the sigmas of "sigma" sampling in `dtype`."""
    device = generator.device if device is None else device
    if settings.timestep_sampling == "sigma":
        u = compute_density_for_timestep_sampling(
            settings.weighting_scheme, batch, settings.logit_mean, settings.logit_std, settings.mode_scale,
            device=generator.device, generator=generator)
        indices = (u * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)
        if scheduler_sigmas is None:
            scheduler_sigmas = flow_match_sigmas(settings, num_train_timesteps)
        timesteps = (scheduler_sigmas[indices] * num_train_timesteps).to(device)  # the scheduler's timesteps
        return timesteps, scheduler_sigmas.to(device, dtype)[indices.to(device)]
    sigmas = drawn_sigmas(batch, settings, generator, image_seq_len).to(device)
    return sigmas * num_train_timesteps, sigmas


def noisy_input(
    latents: torch.Tensor,
    noise: torch.Tensor,
    settings: FlowSettings,
    generator: torch.Generator,
    num_train_timesteps: int = 1000,
    scheduler_sigmas: torch.Tensor | None = None,
    image_seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kohya's get_noisy_model_input_and_timesteps: (noisy latents, timesteps in [0, num_train_timesteps], sigmas
    shaped to broadcast over the latents); the noisy latents and timesteps in the latents' dtype (kohya's
    `weight_dtype`), the sigmas too in "sigma" mode (float32 in the others, as kohya's).

    `scheduler_sigmas` are the sigmas "sigma" sampling reads (default: `flow_match_sigmas(settings, ...)`);
    `image_seq_len` the packed token count flux_shift reads (default: kohya's `(h // 2) * (w // 2)` of
    unpacked latents). The "sigma" index is kept below num_train_timesteps (kohya's can land one past the end
    when the density rounds to 1, e.g. "mode" at u = 0). kohya's ip_noise_gamma: pass the perturbed noise as
    `noise` and keep the unperturbed one for `flow_target` (noise.NoiseDraw's `noised` and `noise`).
    """
    (batch, h, w), dtype = (latents.shape[0], latents.shape[-2], latents.shape[-1]), latents.dtype
    seq_len = (h // 2) * (w // 2) if image_seq_len is None else image_seq_len
    timesteps, sigmas = draw_sigmas(batch, settings, generator, seq_len, num_train_timesteps, scheduler_sigmas,
                                    latents.device, dtype)
    sigmas = sigmas.view(-1, *[1] * (latents.ndim - 1))
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    return noisy.to(dtype), timesteps.to(dtype), sigmas


def model_prediction(
    model_pred: torch.Tensor, noisy_latents: torch.Tensor, sigmas: torch.Tensor, settings: FlowSettings
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """kohya's apply_model_prediction_type: the prediction compared with `flow_target` and the loss weighting,
    which only "sigma_scaled" has (None otherwise)."""
    if settings.model_prediction_type == "additive":
        return model_pred + noisy_latents, None
    if settings.model_prediction_type == "sigma_scaled":
        return model_pred * (-sigmas) + noisy_latents, loss_weighting(settings, sigmas)
    return model_pred, None


def flow_target(noise: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The velocity of the straight path from the latents to the noise."""
    return noise - latents


def loss_weighting(settings: FlowSettings, sigmas: torch.Tensor) -> torch.Tensor:
    """compute_loss_weighting_for_sd3: sigma^-2 for "sigma_sqrt", 2 / (pi (1 - 2 sigma + 2 sigma^2)) for
    "cosmap", ones for the others."""
    return compute_loss_weighting_for_sd3(settings.weighting_scheme, sigmas)


def flow_loss(
    pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor | None, mask: torch.Tensor | None = None,
    loss_type: str = "l2", huber_c: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-image loss as kohya's train_network computes it: elementwise in float32 (MSE, or kohya's `loss_type`
    with its Huber threshold per image, step/loss.py), times the weighting, times the loss mask area-averaged to
    the latent size (apply_masked_loss; `mask` (b, 1, H, W) in [0, 1] at pixel resolution), then the mean over
    all but the batch dimension. Per-image weights and the batch mean are the caller's."""
    loss = conditional_loss(pred.float(), target.float(), loss_type, huber_c)
    if weighting is not None:
        loss = loss * weighting
    if mask is not None:
        loss = loss * F.interpolate(mask.to(loss.device, loss.dtype), size=loss.shape[2:], mode="area")
    return loss.mean(dim=list(range(1, loss.ndim)))
