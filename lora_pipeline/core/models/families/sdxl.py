"""Stable Diffusion XL: the `sdxl` family (two CLIP text encoders, micro-conditioning, sgm key names)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_pipeline.core.models.families.base import KohyaBlocks, ModelFamily

if TYPE_CHECKING:
    import torch

RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}

_DOWN = re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)")
_UP = re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.attentions\.0\.(.+)")
_DOWN_RES = re.compile(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)")
_UP_RES = re.compile(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)")
_MID_RES = re.compile(r"mid_block\.resnets\.(\d+)\.(\w+)")
_DOWNSAMPLER = re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv")
_UPSAMPLER = re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv")



def sgm_module_name(diffusers_name: str, layers_per_block: int, up_levels_with_attention: frozenset[int]
                    = frozenset()) -> str:
    """The SDXL sgm path of a module of a diffusers U-Net (attention, ResNet or sampler).

    sgm numbers the U-Net's sub-blocks flat: input_blocks[0] is conv_in, then each down level contributes
    `layers_per_block` (resnet, attention) pairs and one downsampler (`op`); output_blocks hold `layers_per_block
    + 1` (resnet, attention[, upsampler]) entries per up level; middle_block is (resnet, attention, resnet).
    This is the inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers` / `_convert_unet_lora_key`.
    """
    per_level = layers_per_block + 1
    if m := _DOWN.fullmatch(diffusers_name):
        return f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
    if m := _UP.fullmatch(diffusers_name):
        return f"output_blocks.{int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
    if m := _MID.fullmatch(diffusers_name):
        return f"middle_block.1.{m[1]}"
    if (m := _DOWN_RES.fullmatch(diffusers_name)) and m[3] in RESNET_SGM:
        return f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.0.{RESNET_SGM[m[3]]}"
    if (m := _UP_RES.fullmatch(diffusers_name)) and m[3] in RESNET_SGM:
        return f"output_blocks.{int(m[1]) * per_level + int(m[2])}.0.{RESNET_SGM[m[3]]}"
    if (m := _MID_RES.fullmatch(diffusers_name)) and m[2] in RESNET_SGM:
        return f"middle_block.{2 * int(m[1])}.{RESNET_SGM[m[2]]}"
    if m := _DOWNSAMPLER.fullmatch(diffusers_name):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op"
    if (m := _UPSAMPLER.fullmatch(diffusers_name)) and int(m[1]) in up_levels_with_attention:
        return f"output_blocks.{int(m[1]) * per_level + layers_per_block}.2.conv"
    raise ValueError(f"no sgm name for U-Net module '{diffusers_name}' that diffusers and ComfyUI map back")


def _up_levels_with_attention(unet: Any) -> frozenset[int]:
    return frozenset(i for i, block in enumerate(unet.up_blocks) if getattr(block, "attentions", None))


@dataclass(frozen=True)
class StableDiffusionXL(ModelFamily):
    def is_own_denoiser(self, config: Any) -> bool:
        return config.addition_embed_type == "text_time"

    def conditioning(self, outputs: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The penultimate hidden states of both encoders concatenated on the feature axis, and the pooled
        `text_embeds` of the second (CLIPTextModelWithProjection), as StableDiffusionXLPipeline computes them."""
        import torch

        hidden, pooled = [], None
        for out in outputs:
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def kohya_module_namer(self, denoiser: Any) -> Callable[[str], str]:
        layers_per_block = denoiser.config.layers_per_block
        if not isinstance(layers_per_block, int):
            raise ValueError("sgm naming needs one layers_per_block for every level")
        up_attention = _up_levels_with_attention(denoiser)
        return lambda name: sgm_module_name(name, layers_per_block, up_attention)

    def kohya_block_index(self, lora_name: str) -> int:
        """kohya's get_block_index on sgm names: 0 the embeddings, input_blocks_N at 1+N, middle_block_N at 10+N,
        output_blocks_N at 13+N, 22 the output layers."""
        name = lora_name.removeprefix("lora_unet_")
        for start, first in (("time_embed_", 0), ("label_emb_", 0), ("input_blocks_", 1), ("middle_block_", 10),
                             ("output_blocks_", 13)):
            if name.startswith(start):
                return first if first == 0 else first + int(name.split("_")[2])
        return 22 if name.startswith("out_") else -1


SDXL = StableDiffusionXL(
    name="sdxl", label="an SDXL", text_encoders=("CLIPTextModel", "CLIPTextModelWithProjection"),
    text_prefixes=("lora_te1_", "lora_te2_"), micro_conditioning=True, pipeline="StableDiffusionXLPipeline",
    pipeline_options=(), kohya_base_model_version="sdxl_base_v1-0",
    modelspec_architecture="stable-diffusion-xl-v1-base/lora",
    modelspec_implementation="https://github.com/Stability-AI/generative-models",
    tokenizers=("CLIPTokenizer", "CLIPTokenizer"), kohya_blocks=KohyaBlocks(down=9, mid=3, edges=True),
)
