"""Which modules of a family's denoiser carry kohya's LoRA, and their kohya keys, by the family's `kohya_layout`.

"per_module" (SD 1.x, SDXL): kohya's U-Net targets, one kohya module per diffusers module, named by the family's
`kohya_module_namer`. "bfl_fused" (FLUX.1): every Linear of the trained blocks (`train_blocks`), written in Black
Forest Labs' layout where several diffusers modules are one fused Linear (flux_names.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lora_pipeline.core.models.families import ModelFamily
from lora_pipeline.core.models.flux_names import (
    ALPHA,
    DOWN,
    TRANSFORMER,
    UP,
    flux_kohya_state_dict,
    flux_target_modules,
)
from lora_pipeline.core.models.kohya_names import UNET_PREFIX

# kohya's default U-Net targets: every Linear / 1x1 Conv2d inside the transformer blocks (Transformer2DModel).
KOHYA_UNET_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]

ModuleTensors = dict[str, dict[str, torch.Tensor]]  # {diffusers module path: {key suffix: tensor}}


def per_module_keys(family: ModelFamily, denoiser: Any, names: list[str]) -> dict[str, str]:
    """{diffusers module path: its kohya module key} of a "per_module" family's denoiser modules."""
    kohya_path = family.kohya_module_namer(denoiser)
    return {name: UNET_PREFIX + kohya_path(name).replace(".", "_") for name in names}


def _per_module_tensors(family: ModelFamily, denoiser: Any, modules: ModuleTensors) -> dict[str, torch.Tensor]:
    keys = per_module_keys(family, denoiser, list(modules))
    return {keys[name] + suffix: tensor for name, tensors in modules.items() for suffix, tensor in tensors.items()}


def _fused_tensors(family: ModelFamily, denoiser: Any, modules: ModuleTensors) -> dict[str, torch.Tensor]:
    if any(set(tensors) - {DOWN, UP, ALPHA} for tensors in modules.values()):
        raise ValueError(f"{family.label} LoRA in kohya's layout holds lora_down, lora_up and alpha only (no DoRA)")
    return flux_kohya_state_dict({f"{TRANSFORMER}.{name}": (t[DOWN], t[UP], float(t[ALPHA]))
                                  for name, t in modules.items()})


_LAYOUTS: dict[str, tuple[Callable[[Any, str], list[str]],
                          Callable[[ModelFamily, Any, ModuleTensors], dict[str, torch.Tensor]]]] = {
    "per_module": (lambda denoiser, train_blocks: list(KOHYA_UNET_TARGET_MODULES), _per_module_tensors),
    "bfl_fused": (flux_target_modules, _fused_tensors),
}


def lora_targets(family: ModelFamily, denoiser: Any, train_blocks: str = "all") -> list[str]:
    """The denoiser's modules (peft `target_modules`) that kohya's LoRA of this family trains."""
    return _LAYOUTS[family.kohya_layout][0](denoiser, train_blocks)


def denoiser_kohya_tensors(family: ModelFamily, denoiser: Any, modules: ModuleTensors) -> dict[str, torch.Tensor]:
    """{kohya key: tensor} of the denoiser's LoRA modules, given as {diffusers module path: {suffix: tensor}}
    (suffixes ".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale")."""
    return _LAYOUTS[family.kohya_layout][1](family, denoiser, modules)
