"""The T5 part of a FLUX.1 LoRA file (`lora_te3_…`, from recipes with `train_t5xxl`) on a pipeline's T5 encoder.

diffusers' FLUX loader (0.42: `_convert_kohya_flux_lora_to_diffusers` keeps `lora_unet_`, `lora_te_` and
`lora_te1_` keys only) drops T5's modules without a word, and FluxPipeline's `set_adapters` / `delete_adapters`
reach the transformer and CLIP-L only. So sampling.py puts the T5 modules on `text_encoder_2` itself, as a peft
adapter under the name `load_lora_weights` gave the rest, and weights and deletes it with the rest: a grid shows the
whole LoRA. The modules are read back by flux_names.flux_from_kohya, the inverse of how they were written.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lora_pipeline.core.models.flux_names import T5, T5_PREFIX, flux_from_kohya


def _t5_of(pipe: Any) -> Any | None:
    return getattr(pipe, T5, None)


def _carries(encoder: Any, adapter: str) -> bool:
    """Whether some module of the encoder holds a LoRA adapter of this name."""
    return any(adapter in getattr(module, "lora_A", {}) for module in encoder.modules())


def load_t5_lora(pipe: Any, tensors: dict[str, torch.Tensor], adapter: str) -> None:
    """Put the kohya tensors' T5 modules, if any, on the pipeline's T5 encoder as LoRA adapter `adapter`."""
    from peft import LoraConfig, inject_adapter_in_model

    found = {key: tensor for key, tensor in tensors.items() if key.startswith(T5_PREFIX)}
    if not found:
        return
    encoder = _t5_of(pipe)
    if encoder is None:
        raise ValueError(f"the LoRA has T5 modules ({T5_PREFIX}…) but the pipeline has no {T5}")
    modules = {name.removeprefix(f"{T5}."): factors for name, factors in flux_from_kohya(found).items()}
    first = next(iter(modules.values()))
    config = LoraConfig(
        r=first.down.shape[0],
        lora_alpha=first.alpha,
        target_modules=list(modules),
        rank_pattern={re.escape(path): f.down.shape[0] for path, f in modules.items()},
        alpha_pattern={re.escape(path): f.alpha for path, f in modules.items()},
    )
    inject_adapter_in_model(config, encoder, adapter_name=adapter)
    layers = dict(encoder.named_modules())
    with torch.no_grad():
        for path, factors in modules.items():
            layers[path].lora_A[adapter].weight.copy_(factors.down)
            layers[path].lora_B[adapter].weight.copy_(factors.up)


def weigh_t5_lora(pipe: Any, adapter: str, weight: float) -> None:
    """Make `adapter` the T5 encoder's active LoRA at `weight`, where it carries one (as set_adapters does for
    the other components)."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    encoder = _t5_of(pipe)
    if encoder is not None and _carries(encoder, adapter):
        set_weights_and_activate_adapters(encoder, [adapter], [weight])


def delete_t5_lora(pipe: Any, adapter: str) -> None:
    """Remove `adapter` from the T5 encoder, where it carries one, and from the peft configuration that injecting
    it left on the encoder (diffusers' delete_adapter_layers clears that for models it loaded itself only)."""
    from diffusers.utils.peft_utils import delete_adapter_layers

    encoder = _t5_of(pipe)
    if encoder is None or not _carries(encoder, adapter):
        return
    delete_adapter_layers(encoder, adapter)
    configs = getattr(encoder, "peft_config", {})
    configs.pop(adapter, None)
    if not configs and hasattr(encoder, "peft_config"):
        del encoder.peft_config
