"""DoRA files in diffusers: the magnitudes that diffusers' loader drops, put back on its peft adapter.

A DoRA module of a kohya/LyCORIS file holds `lora_down`, `lora_up`, `alpha` and `dora_scale`, the magnitude m
per output channel, shaped (out, 1) / (out, 1, 1, 1) (LyCORIS' `wd_on_output` layout). At weight 1 it stands for

    W' = m * (W + dW) / ||W + dW||      (norm of each output row; dW = alpha / rank * up @ down)

which is what peft trains and LyCORIS applies. diffusers 0.42's `load_lora_weights` drops every `dora_scale`
("not compatible in Diffusers") and would show a plain LoRA; `attach_dora` turns each module the loader placed
into peft's DoRA variant with the file's magnitude. A weight w then gives W + w * (W' - W), the line between
the base and the DoRA weight on which ComfyUI and A1111 put a LoRA's strength; peft's own `set_scale` would
scale dW inside the norm and keep the magnitudes, so its weight 0 would not be the base model.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from lora_pipeline.core.models.families import ModelFamily
from lora_pipeline.core.models.kohya_names import text_key_prefixes
from lora_pipeline.core.models.lora_layout import denoiser_key_namer

DORA_SCALE = ".dora_scale"


def adapter_modules(model: Any, adapter: str) -> list[tuple[str, Any]]:
    """(module path, peft LoRA, LoHa or LoKr layer) of every module of `model` that holds adapter `adapter`."""
    from peft.tuners.lora import LoraLayer

    from lora_pipeline.core.models.lycoris import is_lycoris_layer

    return [(name, module) for name, module in model.named_modules()
            if (isinstance(module, LoraLayer) and adapter in module.lora_A)
            or (is_lycoris_layer(module) and adapter in module.r)]


def split_dora(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the tensors without `dora_scale`, {kohya module key: its dora_scale})."""
    plain = {k: v for k, v in tensors.items() if not k.endswith(DORA_SCALE)}
    return plain, {k.removesuffix(DORA_SCALE): v for k, v in tensors.items() if k.endswith(DORA_SCALE)}


class _Interpolating:
    """A peft DoRA layer whose output at scaling `s` is s / full_scaling times its output at full scaling."""

    full_scaling: float

    def forward(self, x: torch.Tensor, *, scaling: float, **kwargs: Any) -> torch.Tensor:
        weight = scaling / self.full_scaling
        return weight * super().forward(x, scaling=self.full_scaling, **kwargs)  # type: ignore[misc]


@functools.cache
def _interpolating(layer_class: type) -> type:
    return type(f"Interpolating{layer_class.__name__}", (_Interpolating, layer_class), {})


def attach_dora(module: Any, adapter: str, magnitude: torch.Tensor) -> None:
    """Make the plain LoRA `adapter` of peft layer `module` a DoRA with this magnitude per output channel."""
    from peft.tuners.lora.dora import DoraConv2dLayer, DoraLinearLayer

    base = module.get_base_layer()
    if not isinstance(base, torch.nn.Linear | torch.nn.Conv2d):
        raise ValueError(f"DoRA on a {type(base).__name__} is not supported")
    layer = _interpolating(DoraLinearLayer if isinstance(base, torch.nn.Linear) else DoraConv2dLayer)(
        fan_in_fan_out=False)
    layer.full_scaling = module.lora_alpha[adapter] / module.r[adapter]
    # peft's shapes: (out,) for a Linear, (1, out, 1, 1) for a Conv2d
    shape = (-1,) if isinstance(base, torch.nn.Linear) else (1, -1, *[1] * (base.weight.ndim - 2))
    reference = module.lora_A[adapter].weight
    layer.weight = torch.nn.Parameter(magnitude.detach().reshape(shape).to(reference), requires_grad=False)
    module.lora_magnitude_vector[adapter] = layer
    module.lora_variant[adapter] = module.lora_variants[("use_dora",)]()
    module.use_dora[adapter] = True


def attach_file_dora(family: ModelFamily, denoiser: Any, text_encoders: Sequence[Any], adapter: str,
                     scales: dict[str, torch.Tensor]) -> None:
    """Attach each `dora_scale` of a file ({kohya module key: magnitude}, `split_dora`) to the module of adapter
    `adapter` that the loader placed under that key; a key without a placed module is an error (the file would
    be shown without it)."""
    placed: dict[str, Any] = {}
    if scales:
        key = denoiser_key_namer(family, denoiser)
        placed.update({key(name): module for name, module in adapter_modules(denoiser, adapter)})
        for prefix, encoder in text_key_prefixes(family.lora_text_prefixes(train_t5xxl=True), text_encoders,
                                                 family.t5_prefix):
            placed.update({prefix + name.replace(".", "_"): module
                           for name, module in adapter_modules(encoder, adapter)})
    missing = sorted(set(scales) - set(placed))
    if missing:
        raise ValueError(f"the loader placed no LoRA module for {len(missing)} DoRA module(s), e.g. {missing[0]}")
    for name, magnitude in scales.items():
        attach_dora(placed[name], adapter, magnitude)
