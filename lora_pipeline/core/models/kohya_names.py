"""kohya's key names for LoRA modules, and their form for diffusers' loader.

Keys are `lora_unet_…`, `lora_te_…` (SD 1.x) or `lora_te1_…` / `lora_te2_…` (SDXL), then the module path with
dots as underscores. SD 1.x U-Net paths are the diffusers ones; SDXL U-Net paths are Stability's sgm names, as
kohya's SDXL U-Net names them (`sgm_module_name`). Training (core/training/kohya/) writes them; sampling
(sampling.py) loads them back.
"""

from __future__ import annotations

import re
from typing import Any

import torch

UNET_PREFIX = "lora_unet_"
TEXT_MODEL = "text_model_"
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


def text_prefixes(family: str) -> list[str]:
    return ["lora_te_"] if family == "sd15" else ["lora_te1_", "lora_te2_"]


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


def for_diffusers(tensors: dict[str, torch.Tensor], text_encoders: list[Any]) -> dict[str, torch.Tensor]:
    """kohya tensors as diffusers' `load_lora_weights` can place them in these text encoders: diffusers 0.42 keeps
    kohya's `text_model` level, which transformers 5's CLIP models no longer have, and then finds no text-encoder
    keys at all ("No LoRA keys associated to CLIPTextModel") and drops them. The level is removed where the
    encoder lacks it; U-Net keys are unchanged."""
    out = dict(tensors)
    owners = {"lora_te_": 0, "lora_te1_": 0, "lora_te2_": 1}
    for prefix, index in owners.items():
        if index >= len(text_encoders) or hasattr(text_encoders[index], "text_model"):
            continue
        for key in [k for k in out if k.startswith(prefix + TEXT_MODEL)]:
            out[prefix + key[len(prefix + TEXT_MODEL):]] = out.pop(key)
    return out
