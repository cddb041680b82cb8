"""kohya's key names for LoRA modules, and their form for diffusers' loader.

Keys are `lora_unet_…` or a text encoder's prefix (the family's `text_prefixes`: `lora_te_…` for SD 1.x,
`lora_te1_…` / `lora_te2_…` for SDXL), then the module path with dots as underscores; the family says the path
(families/: SD 1.x U-Net paths are the diffusers ones, SDXL's are Stability's sgm names). Training
(core/training/kohya/) writes them; sampling (sampling.py) loads them back.
"""

from __future__ import annotations

from typing import Any

import torch

UNET_PREFIX = "lora_unet_"
TEXT_MODEL = "text_model_"
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
