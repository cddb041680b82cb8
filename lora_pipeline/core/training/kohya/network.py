"""The trained network, as kohya's networks/lora.py builds it, on peft adapters; and its kohya key names.

U-Net: every Linear / Conv2d inside the transformer blocks (kohya's UNET_TARGET_REPLACE_MODULE) at
network_dim / network_alpha. With `conv_dim` (LoCon, kohya's network_args conv_dim / conv_alpha) also every
Linear / Conv2d inside ResnetBlock2D, Downsample2D and Upsample2D: the 3x3 convolutions at conv_dim /
conv_alpha, the time-embedding projection and 1x1 shortcuts at network_dim / network_alpha (kohya's rule).
Text encoders (network_train_unet_only: false): every Linear of CLIPAttention and CLIPMLP, and of FLUX.1's T5
(with `train_t5xxl`) every Linear of T5Attention and T5DenseGatedActDense (kohya's lora_flux.py targets).

Keys are `lora_unet_…`, `lora_te_…` (SD 1.x), `lora_te1_…` / `lora_te2_…` (SDXL) or `lora_te3_…` (FLUX.1's T5),
then the module path with dots as underscores, then `.lora_down.weight`, `.lora_up.weight`, `.alpha`. SD 1.x
U-Net paths are the diffusers ones; SDXL U-Net paths are Stability's sgm names (`input_blocks_4_1_…`,
`input_blocks_4_0_in_layers_2` for a ResNet's conv1, `…_out_layers_3` conv2, `…_emb_layers_1` time_emb_proj,
`…_skip_connection` conv_shortcut, `input_blocks_3_0_op` a downsampler, `output_blocks_2_2_conv` an upsampler) as
kohya's SDXL U-Net names them.

DoRA (`use_dora`, peft's weight decomposition: magnitude per output channel) adds `.dora_scale` per module,
shaped (out, 1) / (out, 1, 1, 1) as LyCORIS writes it with wd_on_out; diffusers reads it into peft's
magnitude vector, ComfyUI recognises the output axis by that shape.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lora_pipeline.core.models.families import model_family
from lora_pipeline.core.models.kohya_names import TEXT_MODEL
from lora_pipeline.core.models.lora_layout import KOHYA_UNET_TARGET_MODULES, denoiser_kohya_tensors, lora_targets
from lora_pipeline.core.training.recipe_groups import NetworkSettings
from lora_pipeline.core.training.seeds import Stream, derive_seed

if TYPE_CHECKING:  # loading imports diffusers; `lora-pipeline provenance` reads files without it
    from lora_pipeline.core.models.loading import BaseModel

CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # kohya's UNET_TARGET_REPLACE_MODULE_CONV2D_3X3
# kohya's TEXT_ENCODER_TARGET_REPLACE_MODULE (networks/lora.py, and lora_flux.py's T5 ones)
TEXT_BLOCKS = ("CLIPAttention", "CLIPMLP", "T5Attention", "T5DenseGatedActDense")


def _is_target_child(module: Any) -> bool:
    return isinstance(module, torch.nn.Linear | torch.nn.Conv2d)


def _is_3x3(module: Any) -> bool:
    return isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)


def conv_targets(unet: Any) -> dict[str, bool]:
    """{module path: is a 3x3 conv} of every Linear / Conv2d inside kohya's LoCon blocks."""
    found: dict[str, bool] = {}
    for name, block in unet.named_modules():
        if type(block).__name__ in CONV_BLOCKS:
            for child_name, child in block.named_modules():
                if child_name and _is_target_child(child):
                    found[f"{name}.{child_name}"] = _is_3x3(child)
    return found


def add_unet_lora(unet: Any, rank: int, alpha: float, adapter_name: str = "default", *, conv_dim: int | None = None,
                  conv_alpha: float = 1.0, use_dora: bool = False,
                  target_modules: Sequence[str] = tuple(KOHYA_UNET_TARGET_MODULES)) -> None:
    """Wrap kohya's target modules (default: the U-Net's; a family's `lora_targets`) in a peft LoRA: down
    kaiming-uniform, up zero (as kohya), scale alpha/rank."""
    from peft import LoraConfig  # imported here: peft takes seconds to import, provenance never needs it

    targets: list[str] = list(target_modules)
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    if conv_dim is not None:
        for name, is_3x3 in conv_targets(unet).items():
            targets.append(name)
            if is_3x3:
                ranks[re.escape(name)], alphas[re.escape(name)] = conv_dim, conv_alpha
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True,
                        rank_pattern=ranks, alpha_pattern=alphas, use_dora=use_dora)
    unet.add_adapter(config, adapter_name=adapter_name)
    # peft casts each LoRA input to the (float32) LoRA weight dtype: under bf16 autocast that is a full copy of
    # every activation, cast straight back by autocast for the matmul (30% of H100 time in a profile). The
    # matmul sees the same bf16 operands without it; in float32 training it was a no-op anyway.
    for module in unet.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False


def text_targets(encoder: Any) -> list[str]:
    return [f"{name}.{child_name}" for name, block in encoder.named_modules() if type(block).__name__ in TEXT_BLOCKS
            for child_name, child in block.named_modules() if child_name and isinstance(child, torch.nn.Linear)]


def add_text_encoder_lora(encoder: Any, rank: int, alpha: float, adapter_name: str = "default", *,
                          use_dora: bool = False) -> None:
    """kohya's text-encoder LoRA: every Linear of the CLIP (or T5) attention and MLP blocks."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=text_targets(encoder), init_lora_weights=True,
                        use_dora=use_dora)
    inject_adapter_in_model(config, encoder, adapter_name=adapter_name)


def host_clone(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy (kohya_state_dict's default `copy`)."""
    return tensor.detach().cpu().clone()


def _module_tensors(module: Any, adapter: str, key: str,
                    copy: Callable[[torch.Tensor], torch.Tensor] = host_clone) -> dict[str, torch.Tensor]:
    alpha = float(module.lora_alpha[adapter])
    if not math.isclose(module.scaling[adapter], alpha / module.r[adapter]):
        raise ValueError(f"{key}: only the plain scale alpha/rank (no rsLoRA) has a kohya form")
    out = {
        f"{key}.lora_down.weight": copy(module.lora_A[adapter].weight),
        f"{key}.lora_up.weight": copy(module.lora_B[adapter].weight),
        f"{key}.alpha": torch.tensor(alpha, dtype=torch.float32),
    }
    if module.use_dora.get(adapter):
        magnitude = copy(module.lora_magnitude_vector[adapter].weight)
        weight = module.get_base_layer().weight
        out[f"{key}.dora_scale"] = magnitude.reshape(weight.shape[0], *[1] * (weight.ndim - 1))
    return out


def _adapter_modules(model: Any, adapter: str) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_A]


def kohya_state_dict(unet: Any, family: str, network_alpha: float | None = None, adapter_name: str = "default",
                     text_encoders: list[Any] | None = None,
                     copy: Callable[[torch.Tensor], torch.Tensor] = host_clone) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the adapters' weights under kohya key names, with each module's alpha (and
    dora_scale). `network_alpha`, when given, is checked against every non-LoCon module's alpha. `copy` makes
    each weight's copy (the trainer's background saving keeps them on the device, then copies them over at once:
    run/writer.py)."""
    architecture = model_family(family)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in _adapter_modules(unet, adapter_name):
        alpha = module.lora_alpha[adapter_name]
        locon = _is_3x3(module.get_base_layer())
        if network_alpha is not None and not locon and not math.isclose(alpha, network_alpha):
            raise ValueError(f"{name}: adapter alpha {alpha} is not {network_alpha}")
        modules[name] = _module_tensors(module, adapter_name, "", copy)
    if not modules:
        raise ValueError(f"the U-Net has no LoRA adapter named '{adapter_name}'")
    tensors = denoiser_kohya_tensors(architecture, unet, modules)
    # an encoder without an adapter (FLUX.1's T5 without train_t5xxl) writes nothing
    for prefix, encoder in zip(architecture.lora_text_prefixes(train_t5xxl=True), text_encoders or [], strict=False):
        # kohya's CLIP names have transformers 4's `text_model` level, which transformers 5's CLIP models dropped
        level = "" if hasattr(encoder, "text_model") or prefix == architecture.t5_prefix else TEXT_MODEL
        for name, module in _adapter_modules(encoder, adapter_name):
            tensors.update(_module_tensors(module, adapter_name, prefix + level + name.replace(".", "_"), copy))
    return tensors


def lora_text_encoders(base: BaseModel, train_t5xxl: bool = False) -> list[Any]:
    """The text encoders that carry a LoRA when they train: those with a kohya prefix (FLUX.1: CLIP-L, and T5
    with `train_t5xxl`)."""
    return base.text_encoders[:len(base.architecture.lora_text_prefixes(train_t5xxl))]


def trainable(base: BaseModel) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters being trained: the U-Net's under their own names, text encoder i's as `te<i>.<name>`."""
    named = {n: p for n, p in base.denoiser.named_parameters() if p.requires_grad}
    for i, encoder in enumerate(base.text_encoders):
        named.update({f"te{i}.{n}": p for n, p in encoder.named_parameters() if p.requires_grad})
    return named


def add_network(base: BaseModel, network: NetworkSettings, seed: int,
                resume_from: dict[str, torch.Tensor] | None = None) -> None:
    """The recipe's adapters on the base model (float32 weights, init from the recipe's `seed`), optionally set to
    the weights of a resume state."""
    from diffusers.training_utils import cast_training_params

    with torch.random.fork_rng(devices=[]):  # peft draws the LoRA init from the global RNG
        torch.manual_seed(derive_seed(seed, Stream.INIT))
        add_unet_lora(base.denoiser, network.network_dim, network.network_alpha, conv_dim=network.conv_dim,
                      conv_alpha=network.conv_alpha_value, use_dora=network.use_dora,
                      target_modules=lora_targets(base.architecture, base.denoiser, network.train_blocks))
        if not network.network_train_unet_only:
            for encoder in lora_text_encoders(base, network.train_t5xxl):
                add_text_encoder_lora(encoder, network.network_dim, network.network_alpha, use_dora=network.use_dora)
    for module in (base.denoiser, *base.text_encoders):
        cast_training_params(module, dtype=torch.float32)
    if resume_from is not None:
        named = trainable(base)
        with torch.no_grad():
            for name, tensor in resume_from.items():
                named[name].copy_(tensor)


def param_groups(base: BaseModel, text_encoder_lr: float | None) -> list[Any]:
    """One group, or the U-Net's and the text encoders' (text_encoder_lr) as kohya's prepare_optimizer_params."""
    unet = [p for p in base.denoiser.parameters() if p.requires_grad]
    text = [p for e in base.text_encoders for p in e.parameters() if p.requires_grad]
    if text_encoder_lr is None:
        return unet + text
    return [{"params": unet}, {"params": text, "lr": text_encoder_lr}]


def network_args(network: NetworkSettings) -> dict[str, str]:
    """kohya's ss_network_args: the `key=value` network_args as strings (LyCORIS' algo/dora_wd for DoRA; FLUX.1's
    train_t5xxl as kohya's "True")."""
    args: dict[str, str] = {}
    if network.train_t5xxl:
        args.update(train_t5xxl="True")
    if network.conv_dim is not None:
        args.update(conv_dim=str(network.conv_dim), conv_alpha=str(network.conv_alpha_value))
    if network.use_dora:
        args.update(algo="lora", dora_wd="True", wd_on_out="True")
    return args
