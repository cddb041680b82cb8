"""kohya's key names for LoRA modules, and their form for diffusers' loader.

Keys are `lora_unet_…` or a text encoder's prefix (the family's `text_prefixes`: `lora_te_…` for SD 1.x,
`lora_te1_…` / `lora_te2_…` for SDXL), then the module path with dots as underscores; the family says the path
(families/: SD 1.x U-Net paths are the diffusers ones, SDXL's are Stability's sgm names). Training
(core/training/kohya/) writes them; sampling (sampling.py) loads them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

UNET_PREFIX = "lora_unet_"
TEXT_MODEL = "text_model_"


def text_key_prefixes(prefixes: Sequence[str], encoders: Sequence[Any], t5_prefix: str = "") -> list[tuple[str, Any]]:
    """(key prefix, encoder) of each text encoder carrying a LoRA, in order: the family's prefix, then kohya's
    `text_model_` level where the CLIP model lacks it (transformers 5's CLIP models dropped transformers 4's
    `text_model` level, which kohya's names keep); T5's prefix (`t5_prefix`) takes no level. A module's key is
    the prefix and its module path with dots as underscores."""
    return [(prefix if hasattr(encoder, "text_model") or prefix == t5_prefix else prefix + TEXT_MODEL, encoder)
            for prefix, encoder in zip(prefixes, encoders, strict=False)]

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
