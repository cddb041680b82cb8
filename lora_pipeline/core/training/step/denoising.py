"""The objective of one batch: its tensors (`StepBatch`), its random inputs (`StepNoise`, drawn on the host) and
the loss, DDPM's (`denoising_loss`: kohya's noise options, loss types, masks, per-image weights, min-SNR and
debiased weighting) or FLUX.1's rectified flow (`flow_batch_loss`). Device work only: the fast path captures it
(fastpath.py); loop.py runs it in a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from lora_pipeline.core.models.loading import host_to_device
from lora_pipeline.core.training.recipe_groups import NoiseSettings
from lora_pipeline.core.training.step.flux_step import RectifiedFlow
from lora_pipeline.core.training.step.loss import conditional_loss, huber_threshold
from lora_pipeline.core.training.step.noise import debiased_weight
from lora_pipeline.core.training.step.noise import draw_noise as draw_host_noise


@dataclass
class StepBatch:
    """A batch's tensors on the device. Its text conditioning is either given (`encoder_hidden_states`, and SDXL's
    and FLUX.1's pooled `text_embeds`), or, where the text encoders carry a LoRA that trains, their token ids
    (`input_ids` for the first encoder, `input_ids_2` for the second), which the step encodes with gradients
    (`StepParts.conditioned`), so a captured step holds the encoders' forward and backward too."""

    latents: torch.Tensor  # scaled latents (b, c, h, w)
    encoder_hidden_states: torch.Tensor | None
    text_embeds: torch.Tensor | None = None  # SDXL pooled text embeddings
    time_ids: torch.Tensor | None = None  # SDXL micro-conditioning
    mask: torch.Tensor | None = None  # (b, 1, H, W) loss masks in [0, 1] at pixel resolution (masked_loss)
    loss_weights: torch.Tensor | None = None  # (b,) per-image weights (prior_loss_weight on class images)
    input_ids: torch.Tensor | None = None  # (b, tokens) of the first text encoder, when the encoders train
    input_ids_2: torch.Tensor | None = None  # (b, tokens) of the second (SDXL's OpenCLIP, FLUX.1's T5)

    def token_ids(self) -> list[torch.Tensor]:
        """The token ids of each text encoder (none where the conditioning is given)."""
        return [ids for ids in (self.input_ids, self.input_ids_2) if ids is not None]


def apply_snr_weight(
    loss: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler, gamma: float, v_prediction: bool
) -> torch.Tensor:
    """kohya's min-SNR weighting: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction."""
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return loss * (clipped / (snr + 1 if v_prediction else snr)).to(loss.device)


@dataclass
class StepNoise:
    """The random inputs of one step, on the latents' device: noise (latents' dtype) and timesteps;
    `perturbation` (ip_noise_gamma) is added to the noise of the noised latents only, the target keeps `noise`."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    perturbation: torch.Tensor | None = None

    def part(self, start: int, size: int) -> StepNoise:
        """The noise of images [start, start + size) (a micro-batch of an accumulated step)."""
        end = start + size
        extra = None if self.perturbation is None else self.perturbation[start:end]
        return StepNoise(self.noise[start:end], self.timesteps[start:end], extra)


def draw_noise(
    latents: torch.Tensor, scheduler: DDPMScheduler, generator: torch.Generator, settings: NoiseSettings,
    images: int | None = None,
) -> StepNoise:
    """Noise and timesteps drawn from `generator` (CPU, so a run is reproducible on any device; noise.draw_noise),
    then moved: for `images` images of the latents' shape (default: as many as `latents` has)."""
    shape = (latents.shape[0] if images is None else images, *latents.shape[1:])
    host = draw_host_noise(shape, scheduler.config.num_train_timesteps, generator, settings)
    device, dtype = latents.device, latents.dtype
    extra = None if host.perturbation is None else host_to_device(host.perturbation, device).to(dtype)
    return StepNoise(host_to_device(host.noise, device).to(dtype), host_to_device(host.timesteps, device), extra)


def denoising_loss(
    unet: torch.nn.Module, scheduler: DDPMScheduler, batch: StepBatch, drawn: StepNoise, settings: NoiseSettings
) -> torch.Tensor:
    """The loss of one batch from its drawn noise: device work only (no host sync), so it can be graph-captured."""
    latents, noise, timesteps = batch.latents, drawn.noise, drawn.timesteps
    noised = noise if drawn.perturbation is None else noise + drawn.perturbation
    noisy = scheduler.add_noise(latents, noised, timesteps)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    added = None
    if batch.text_embeds is not None:
        added = {"text_embeds": batch.text_embeds, "time_ids": batch.time_ids}
    pred = unet(noisy, timesteps, batch.encoder_hidden_states, added_cond_kwargs=added).sample
    huber_c = huber_threshold(settings, timesteps, scheduler.config.num_train_timesteps, scheduler.alphas_cumprod)
    loss = conditional_loss(pred.float(), target.float(), settings.loss_type, huber_c)
    if batch.mask is not None:  # kohya's apply_masked_loss: the mask area-averaged to the latent size
        loss = loss * F.interpolate(batch.mask.to(loss.device, loss.dtype), size=loss.shape[2:], mode="area")
    loss = loss.mean(dim=[1, 2, 3])
    if batch.loss_weights is not None:
        loss = loss * batch.loss_weights.to(loss.device)
    if settings.min_snr_gamma:
        loss = apply_snr_weight(loss, timesteps, scheduler, settings.min_snr_gamma, v_prediction)
    if settings.debiased_estimation_loss:
        loss = debiased_weight(loss, timesteps, scheduler)
    return loss.mean()


def draw_flow_noise(flow: RectifiedFlow, latents: torch.Tensor, generator: torch.Generator,
                    images: int | None = None) -> StepNoise:
    """The flow objective's noise and sigmas (in `timesteps`) for `images` images of the latents' shape (default: as
    many as `latents` has), drawn from `generator` (CPU) then moved."""
    noise, sigmas = flow.draw((latents.shape[0] if images is None else images, *latents.shape[1:]), generator)
    return StepNoise(host_to_device(noise, latents.device).to(latents.dtype), host_to_device(sigmas, latents.device))


def flow_batch_loss(transformer: torch.nn.Module, flow: RectifiedFlow, batch: StepBatch, drawn: StepNoise
                    ) -> torch.Tensor:
    """The flow objective's loss of one batch from its drawn noise and sigmas."""
    return flow.loss(transformer, batch.latents, drawn.noise, drawn.timesteps, batch.encoder_hidden_states,
                     batch.text_embeds, batch.mask, batch.loss_weights)


def compute_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    batch: StepBatch,
    generator: torch.Generator,
    settings: NoiseSettings,
    flow: RectifiedFlow | None = None,
) -> torch.Tensor:
    """The loss of one batch, DDPM's or (with `flow`) the rectified flow's; all randomness drawn from `generator`
    (CPU) then moved."""
    if flow is not None:
        return flow_batch_loss(unet, flow, batch, draw_flow_noise(flow, batch.latents, generator))
    return denoising_loss(unet, scheduler, batch, draw_noise(batch.latents, scheduler, generator, settings), settings)
