"""The frozen parts of the model: VAE latents and text conditioning, cached where the recipe allows.

Latents are cached once per image when `cache_latents` is on (kohya's default for LoRA); text embeddings
are cached per caption only when captions are not shuffled, since a shuffled caption is new at every step
and is encoded then, without gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lora_pipeline.core.models.loading import BaseModel, encode_prompts, host_to_device, sdxl_add_time_ids
from lora_pipeline.core.training.data import TrainImage
from lora_pipeline.core.training.seeds import Stream, torch_generator
from lora_pipeline.core.training.timing import StageTimes


@torch.no_grad()
def encode_latents(base: BaseModel, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scaled VAE latents (b, 4, h/8, w/8) in float32, sampled from the posterior as kohya caches them."""
    vae = base.vae
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.sample(generator=generator).float() * base.latents_scaling_factor


class LatentSource:
    """Latents of training images: cached once, or encoded per step (seeded by the step) without a cache."""

    def __init__(self, base: BaseModel, images: Sequence[TrainImage], seed: int, cache: bool, device: torch.device):
        self.base, self.images, self.seed, self.device = base, images, seed, device
        self.cache: list[torch.Tensor] | None = None
        if cache:
            self.cache = [
                encode_latents(base, image.pixels()[None], torch_generator(seed, Stream.LATENTS, index))[0].to(device)
                for index, image in enumerate(images)
            ]

    def batch(self, indices: Sequence[int], global_step: int) -> torch.Tensor:
        if self.cache is not None:
            return torch.stack([self.cache[i] for i in indices])
        pixels = torch.stack([self.images[i].pixels() for i in indices])
        generator = torch_generator(self.seed, Stream.LATENTS, 1 << 32, global_step)
        return encode_latents(self.base, pixels, generator).to(self.device)


@dataclass
class TextConditioning:
    hidden: torch.Tensor  # encoder_hidden_states (b, 77, cross_attention_dim)
    pooled: torch.Tensor | None  # SDXL text_embeds (b, projection_dim); None for SD 1.5


class TextSource:
    """Text conditioning for captions; a per-caption cache when the same caption text recurs (no shuffling)."""

    def __init__(self, base: BaseModel, dtype: torch.dtype, device: torch.device, cache_captions: Sequence[str] = (),
                 times: StageTimes | None = None):
        self.base, self.dtype, self.device = base, dtype, device
        self.times = times or StageTimes(device)
        self.cache: dict[str, TextConditioning] = {}
        for caption in dict.fromkeys(cache_captions):
            self.cache[caption] = self._encode([caption])

    def _encode(self, captions: list[str]) -> TextConditioning:
        with self.times.stage("text_encoding"):
            hidden, pooled = encode_prompts(self.base, captions)
        return TextConditioning(
            hidden.to(self.device, self.dtype), None if pooled is None else pooled.to(self.device, self.dtype)
        )

    def batch(self, captions: list[str]) -> TextConditioning:
        if not all(c in self.cache for c in captions):
            return self._encode(captions)
        parts = [self.cache[c] for c in captions]
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return TextConditioning(torch.cat([p.hidden for p in parts]), pooled)


def time_ids(images: Sequence[TrainImage], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """SDXL micro-conditioning per image: original (h, w), crop (top, left), target = bucket (h, w)."""
    rows = [
        sdxl_add_time_ids(
            (image.size[1], image.size[0]), image.crop_top_left, (image.bucket[1], image.bucket[0]), 1, dtype, "cpu"
        )
        for image in images
    ]
    return host_to_device(torch.cat(rows), device)
