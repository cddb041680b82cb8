"""FLUX.1's training step: the rectified-flow loss of a batch (flow.py) through a FluxTransformer2DModel.

The latents are packed 2x2 into (b, h/2 * w/2, 4c) tokens as FluxPipeline packs them, with its image ids (row and
column of each token) and text ids (zeros); the timestep goes in as sigma (timesteps / 1000) and [dev]'s guidance
embedding gets `guidance_scale` (kohya's training --guidance_scale). The prediction is unpacked, then compared with
the flow target as kohya's flux_train_network.py does (model_prediction, flow_loss: the loss mask at latent
resolution), weighted per image (prior_loss_weight, DDP shares) and averaged over the batch. The noise and sigmas
come from the step's seeded CPU generator (`draw_flow`), drawn for the whole step like the DDPM step's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_pipeline.core.training.recipe_groups import NoiseSettings
from lora_pipeline.core.training.step.flow import (
    FlowSettings,
    draw_sigmas,
    flow_loss,
    flow_match_sigmas,
    flow_target,
    model_prediction,
)
from lora_pipeline.core.training.step.loss import huber_threshold

NUM_TRAIN_TIMESTEPS = 1000


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) latents as (b, h/2 * w/2, 4c) tokens of 2x2 patches, as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `height` x `width`."""
    b, _, features = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, features // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) ids of the packed tokens: 0, row, column (FluxPipeline's _prepare_latent_image_ids).

    Made on `device` directly: a copy from host memory cannot be recorded in a CUDA graph (the fast path)."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] += torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] += torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3).to(dtype)


@dataclass(frozen=True)
class RectifiedFlow:
    """The flow objective of one run: its settings, whether the transformer embeds guidance ([dev]), the
    shifted scheduler sigmas that "sigma" sampling reads, and the loss function (`noise`'s loss_type and Huber
    threshold, kohya's train_network applies them to FLUX.1 too; the threshold's timestep is sigma x 1000)."""

    settings: FlowSettings
    guidance_embeds: bool
    scheduler_sigmas: torch.Tensor
    noise: NoiseSettings = NoiseSettings()

    @classmethod
    def of(cls, settings: FlowSettings, transformer: torch.nn.Module,
           noise: NoiseSettings | None = None) -> RectifiedFlow:
        return cls(settings, bool(transformer.config.guidance_embeds),
                   flow_match_sigmas(settings, NUM_TRAIN_TIMESTEPS), noise or NoiseSettings())

    def draw(self, shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, sigmas) of `shape` latents on the host, all from `generator`: the noise first, as kohya draws."""
        noise = torch.randn(shape, generator=generator)
        _, sigmas = draw_sigmas(shape[0], self.settings, generator, (shape[-2] // 2) * (shape[-1] // 2),
                                NUM_TRAIN_TIMESTEPS, self.scheduler_sigmas)
        return noise, sigmas

    def loss(self, transformer: torch.nn.Module, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
             text: torch.Tensor, pooled: torch.Tensor, mask: torch.Tensor | None = None,
             loss_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The batch's mean loss: `text` the T5 hidden states, `pooled` CLIP's pooled output, `mask` (b, 1, H, W)
        at pixel resolution, `loss_weights` (b,) per image."""
        b, _, h, w = latents.shape
        device, dtype = latents.device, latents.dtype
        s = sigmas.to(device, torch.float32).view(-1, 1, 1, 1)
        noisy = ((1.0 - s) * latents + s * noise).to(dtype)
        guidance = torch.full((b,), self.settings.guidance_scale, device=device) if self.guidance_embeds else None
        out = transformer(
            hidden_states=pack_latents(noisy), timestep=s.view(-1).to(dtype), guidance=guidance,
            pooled_projections=pooled, encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=device, dtype=dtype),
            img_ids=latent_image_ids(h, w, device, dtype), return_dict=False,
        )[0]
        pred, weighting = model_prediction(unpack_latents(out, h, w), noisy, s, self.settings)
        huber_c = huber_threshold(self.noise, s.view(-1) * NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS, None)
        loss = flow_loss(pred, flow_target(noise, latents), weighting, mask, self.noise.loss_type, huber_c)
        if loss_weights is not None:
            loss = loss * loss_weights.to(loss.device)
        return loss.mean()
