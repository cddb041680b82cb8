"""Stable Diffusion 1.x (and 2.x-style U-Nets with one CLIP text encoder): the `sd15` family."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_pipeline.core.models.families.base import ModelFamily

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class StableDiffusion1(ModelFamily):
    def is_own_denoiser(self, config: Any) -> bool:
        return config.addition_embed_type != "text_time"

    def conditioning(self, outputs: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text encoder's last hidden state (no clip skip), no pooled embedding."""
        return outputs[0][0], None

    def kohya_module_namer(self, denoiser: Any) -> Callable[[str], str]:
        """kohya's SD 1.x U-Net keys are the diffusers module paths themselves."""
        return lambda name: name


SD15 = StableDiffusion1(
    name="sd15", label="an SD 1.x-style", text_encoders=("CLIPTextModel",), text_prefixes=("lora_te_",),
    micro_conditioning=False, pipeline="StableDiffusionPipeline",
    pipeline_options=(("safety_checker", None), ("feature_extractor", None), ("requires_safety_checker", False)),
    kohya_base_model_version="sd_v1", modelspec_architecture="stable-diffusion-v1/lora",
    modelspec_implementation="diffusers",
)
