"""The noise of a training step, drawn the way kohya's sd-scripts draws it, and the loss weights that depend on it.

`draw_noise` follows train_util.get_noise_noisy_latents_and_timesteps: Gaussian noise, kohya's noise offset
(`noise += offset * randn(b, c, 1, 1)`), multi-resolution (pyramid) noise (custom_train_functions.
pyramid_noise_like: `iterations` upsampled levels at a random 2-4x scale each, weighted `discount ** i`, then
scaled back to unit deviation), uniform timesteps in [min_timestep, max_timestep) (get_timesteps; or, with
`timestep_sampling` sigmoid / logit_normal, OneTrainer's and SimpleTuner's densities over the same range), and
input-perturbation noise (`ip_noise_gamma`: the noised latents get `noise + gamma * randn` while the target stays
`noise`). Every draw comes from one CPU generator in that order, so the same generator gives the same step on any
device.

`zero_terminal_snr` rescales the DDPM betas so the last timestep has zero SNR (Lin et al. 2023; kohya's
fix_noise_scheduler_betas_for_zero_terminal_snr); `v_parameterization` makes the target v. The debiased
estimation loss weights each image by 1/sqrt(SNR) (apply_debiased_estimation; SNR limited to [1e-3, 1000] so
the first and, with a zero-terminal-SNR schedule, the last timestep stay finite).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from lora_pipeline.core.training.recipe_groups import NoiseSettings

MIN_SNR, MAX_SNR = 1e-3, 1000.0


@dataclass
class NoiseDraw:
    """What one step draws, on the host: `noise` is the target's noise, `noised` what goes into the latents
    (noise + the input perturbation of ip_noise_gamma, if any)."""

    noise: torch.Tensor
    perturbation: torch.Tensor | None
    timesteps: torch.Tensor

    @property
    def noised(self) -> torch.Tensor:
        return self.noise if self.perturbation is None else self.noise + self.perturbation


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """kohya's pyramid_noise_like with every draw from `generator` (the 2-4x scale of each level too)."""
    b, c, h, w = noise.shape
    upsample = torch.nn.Upsample(size=(h, w), mode="bilinear")
    noise = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        noise += upsample(torch.randn((b, c, hn, wn), generator=generator)) * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def draw_noise(
    shape: tuple[int, ...] | torch.Size, num_train_timesteps: int, generator: torch.Generator, settings: NoiseSettings
) -> NoiseDraw:
    """Noise, noised-latent noise and timesteps of one batch of `shape`, all from `generator` (CPU)."""
    b, c = shape[:2]
    noise = torch.randn(shape, generator=generator)
    if settings.noise_offset:
        noise = noise + settings.noise_offset * torch.randn((b, c, 1, 1), generator=generator)
    if settings.multires_noise_iterations:
        noise = pyramid_noise(noise, generator, settings.multires_noise_iterations, settings.multires_noise_discount)
    timesteps = draw_timesteps(b, num_train_timesteps, generator, settings)
    perturbation = None
    if settings.ip_noise_gamma:
        perturbation = settings.ip_noise_gamma * torch.randn(shape, generator=generator)
    return NoiseDraw(noise, perturbation, timesteps)


def timestep_share(images: int, generator: torch.Generator, settings: NoiseSettings) -> torch.Tensor | None:
    """Where in the timestep range each image lands, in (0, 1), for the non-uniform modes (None: uniform):
    sigmoid(sigmoid_scale * N(0, 1)) (kohya's FLUX.1 "sigmoid") or sigmoid(N(logit_mean, logit_std)) (SD3's
    logit-normal, OneTrainer's LOGIT_NORMAL); both put most timesteps in the middle of the range."""
    if settings.timestep_sampling == "sigmoid":
        return torch.sigmoid(settings.sigmoid_scale * torch.randn((images,), generator=generator))
    if settings.timestep_sampling == "logit_normal":
        normal = torch.randn((images,), generator=generator)
        return torch.sigmoid(normal * settings.logit_std + settings.logit_mean)
    if settings.timestep_sampling in ("sigma", "uniform"):
        return None
    raise ValueError(f"timestep_sampling {settings.timestep_sampling!r} is not a mode of the DDPM step")


def draw_timesteps(images: int, num_train_timesteps: int, generator: torch.Generator, settings: NoiseSettings
                   ) -> torch.Tensor:
    """kohya's get_timesteps: uniform in [min_timestep, max_timestep) (null: 0 and `num_train_timesteps`), or all
    at max_timestep when the two are equal (drawing nothing). The sigmoid and logit_normal modes place each
    timestep at its drawn share of the same range: low + floor(share * (high - low))."""
    low = 0 if settings.min_timestep is None else settings.min_timestep
    high = num_train_timesteps if settings.max_timestep is None else settings.max_timestep
    if low >= high:
        return torch.full((images,), high, dtype=torch.int64)
    share = timestep_share(images, generator, settings)
    if share is None:
        return torch.randint(low, high, (images,), generator=generator)
    return (low + (share.double() * (high - low)).long()).clamp(low, high - 1)


def debiased_weight(loss: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor:
    """kohya's apply_debiased_estimation: loss / sqrt(SNR(t)) per image."""
    snr = compute_snr(scheduler, timesteps).clamp(MIN_SNR, MAX_SNR)
    return loss * (1.0 / torch.sqrt(snr)).to(loss.device)


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled so that sqrt(alpha_bar) ends at 0 and keeps its first value (Lin et al. 2023, Algorithm 1)."""
    alphas_bar_sqrt = (1 - betas.double()).cumprod(0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).to(betas.dtype)


def training_scheduler(scheduler: DDPMScheduler, settings: NoiseSettings) -> DDPMScheduler:
    """The training DDPM scheduler: v-prediction when `v_parameterization`, else the base model's own prediction
    type; betas rescaled to zero terminal SNR when `zero_terminal_snr`."""
    overrides = {"prediction_type": "v_prediction"} if settings.v_parameterization else {}
    configured = DDPMScheduler.from_config(scheduler.config, **overrides)
    if settings.zero_terminal_snr:
        configured.betas = zero_terminal_snr_betas(configured.betas)
        configured.alphas = 1.0 - configured.betas
        configured.alphas_cumprod = torch.cumprod(configured.alphas, dim=0)
    return configured


def mse_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
