"""Stable Diffusion 1.x (and 2.x-style U-Nets with one CLIP text encoder): the `sd15` family."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_pipeline.core.models.families.base import KohyaBlocks, ModelFamily

if TYPE_CHECKING:
    import torch

_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")  # kohya's


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

    def kohya_block_index(self, lora_name: str) -> int:
        """kohya's get_block_index on diffusers names: IN01-IN11 at 1-11 (3 per level: two layers, the
        downsampler), MID at 12, OUT00-OUT11 at 13-24; IN00 (conv_in) has no LoRA."""
        match = _RE_UPDOWN.search(lora_name)
        if match:
            side, i, kind, j = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
            idx = 3 * i + 2 if kind in ("upsamplers", "downsamplers") else 3 * i + j
            return 1 + idx if side == "down" else 13 + idx
        return 12 if "mid_block_" in lora_name else -1


SD15 = StableDiffusion1(
    name="sd15", label="an SD 1.x-style", text_encoders=("CLIPTextModel",), text_prefixes=("lora_te_",),
    micro_conditioning=False, pipeline="StableDiffusionPipeline",
    pipeline_options=(("safety_checker", None), ("feature_extractor", None), ("requires_safety_checker", False)),
    kohya_base_model_version="sd_v1", modelspec_architecture="stable-diffusion-v1/lora",
    modelspec_implementation="diffusers", kohya_blocks=KohyaBlocks(down=12, mid=1, edges=False),
)
