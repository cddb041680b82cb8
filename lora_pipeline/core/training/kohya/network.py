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

Block-wise ranks, alphas and learning rates (kohya's block_dims, block_alphas, conv_block_dims, conv_block_alphas,
down/mid/up_lr_weight) follow training/blocks.py; the dropouts (network_dropout, rank_dropout, module_dropout) are
hooks on the LoRA layers (kohya/dropout.py) and change nothing in the file.


DoRA (`use_dora`, peft's weight decomposition: magnitude per output channel) adds `.dora_scale` per module: peft's
magnitude m, shaped (out, 1) / (out, 1, 1, 1) as LyCORIS writes it with `wd_on_output` (its default), so that
LyCORIS (kohya's `--network_module lycoris.kohya`) rebuilds the trained weight m * (W + dW) / ||W + dW|| exactly.
The other loaders do not (README, "Where the files load"; measured in test_dora): diffusers' `load_lora_weights`
drops dora_scale with a warning and kohya's networks.lora ignores it (both: the plain LoRA), ComfyUI normalises by
||W|| instead of ||W + dW||, and A1111 normalises per input column. The evaluation puts dora_scale back itself
(core/models/dora.py).

`network_algo: loha | lokr` trains peft's LoHa / LoKr adapters on the same modules instead, written with
LyCORIS' keys (`.hada_w1_a`…, `.lokr_w1`…; core/models/lycoris.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lora_pipeline.core.models import lycoris
from lora_pipeline.core.models.dora import adapter_modules
from lora_pipeline.core.models.families import model_family
from lora_pipeline.core.models.kohya_names import text_key_prefixes
from lora_pipeline.core.models.lora_layout import KOHYA_UNET_TARGET_MODULES, denoiser_kohya_tensors, lora_targets
from lora_pipeline.core.training.blocks import BlockRanks, block_lr_weights, block_network_args, block_ranks
from lora_pipeline.core.training.kohya.dropout import DropoutSettings, add_dropout
from lora_pipeline.core.training.recipe_groups import NetworkSettings
from lora_pipeline.core.training.seeds import Stream, derive_seed

if TYPE_CHECKING:  # loading imports diffusers; `lora-pipeline provenance` reads files without it
    from lora_pipeline.core.models.families.base import ModelFamily
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
                  target_modules: Sequence[str] = tuple(KOHYA_UNET_TARGET_MODULES), algo: str = "lora",
                  factor: int = -1, blocks: tuple[ModelFamily, BlockRanks] | None = None,
                  locon: bool | None = None) -> None:
    """Wrap kohya's target modules (default: the U-Net's; a family's `lora_targets`) in a peft LoRA: down
    kaiming-uniform, up zero (as kohya), scale alpha/rank; or, with `algo` loha / lokr, in peft's LoHa / LoKr
    (LoKr's Kronecker `factor`, -1: as square as the sides allow). `blocks`: (family, its block-wise ranks): every
    module's rank and alpha from its kohya block, no LoRA where that rank is 0 (training/blocks.py); `locon`: the
    3x3 convolutions train too (default: when conv_dim is set)."""
    from peft import LoraConfig  # imported here: peft takes seconds to import, provenance never needs it

    targets: list[str] = list(target_modules)
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    convs = conv_targets(unet) if (conv_dim is not None if locon is None else locon) else {}
    if blocks is not None:
        targets, ranks, alphas = _block_targets(unet, targets, convs, *blocks, default=(rank, alpha))
    else:
        for name, is_3x3 in convs.items():
            targets.append(name)
            if is_3x3 and conv_dim is not None:
                ranks[re.escape(name)], alphas[re.escape(name)] = conv_dim, conv_alpha
    if not targets:
        raise ValueError("block_dims / lr weights leave no U-Net module with a LoRA")
    if algo != "lora":
        config = lycoris.peft_config(algo, rank, alpha, targets, ranks=ranks, alphas=alphas, factor=factor)
    else:
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True,
                            rank_pattern=ranks, alpha_pattern=alphas, use_dora=use_dora)
    unet.add_adapter(config, adapter_name=adapter_name)
    # peft casts each LoRA input to the (float32) LoRA weight dtype: under bf16 autocast that is a full copy of
    # every activation, cast straight back by autocast for the matmul (30% of H100 time in a profile). The
    # matmul sees the same bf16 operands without it; in float32 training it was a no-op anyway.
    for module in unet.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False


def _block_targets(unet: Any, targets: list[str], convs: dict[str, bool], family: ModelFamily, ranks: BlockRanks,
                   default: tuple[int, float]) -> tuple[list[str], dict[str, int], dict[str, float]]:
    """(the modules' full paths, their rank_pattern, their alpha_pattern) under block-wise ranks: kohya's
    create_modules with block_dims (a module of rank 0 gets no LoRA). Patterns only where a module's (rank, alpha)
    is not `default` (peft matches every pattern against every module)."""
    namer = family.kohya_module_namer(unet)
    chosen: list[str] = []
    rank_of: dict[str, int] = {}
    alpha_of: dict[str, float] = {}
    for name, module in unet.named_modules():
        if not _is_target_child(module):
            continue
        if name not in convs and not any(name == t or name.endswith("." + t) for t in targets):
            continue
        index = family.kohya_block_index("lora_unet_" + namer(name).replace(".", "_"))
        dim, alpha = ranks.of(index, _is_3x3(module))
        if dim:
            chosen.append(name)
            if (dim, alpha) != default:
                rank_of[re.escape(name)], alpha_of[re.escape(name)] = dim, alpha
    return chosen, rank_of, alpha_of


def text_targets(encoder: Any) -> list[str]:
    return [f"{name}.{child_name}" for name, block in encoder.named_modules() if type(block).__name__ in TEXT_BLOCKS
            for child_name, child in block.named_modules() if child_name and isinstance(child, torch.nn.Linear)]


def add_text_encoder_lora(encoder: Any, rank: int, alpha: float, adapter_name: str = "default", *,
                          use_dora: bool = False, algo: str = "lora", factor: int = -1) -> None:
    """kohya's text-encoder LoRA (or LoHa / LoKr): every Linear of the CLIP (or T5) attention and MLP blocks."""
    from peft import LoraConfig, inject_adapter_in_model

    if algo != "lora":
        config = lycoris.peft_config(algo, rank, alpha, text_targets(encoder), factor=factor)
    else:
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=text_targets(encoder), init_lora_weights=True,
                            use_dora=use_dora)
    inject_adapter_in_model(config, encoder, adapter_name=adapter_name)


def host_clone(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy (kohya_state_dict's default `copy`)."""
    return tensor.detach().cpu().clone()


def _module_tensors(module: Any, adapter: str, key: str,
                    copy: Callable[[torch.Tensor], torch.Tensor] = host_clone) -> dict[str, torch.Tensor]:
    if lycoris.is_lycoris_layer(module):
        return lycoris.module_tensors(module, adapter, key)
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


def _alpha(module: Any, adapter: str) -> float:
    return float((module.alpha if lycoris.is_lycoris_layer(module) else module.lora_alpha)[adapter])


def kohya_state_dict(unet: Any, family: str, network_alpha: float | None = None, adapter_name: str = "default",
                     text_encoders: list[Any] | None = None,
                     copy: Callable[[torch.Tensor], torch.Tensor] = host_clone) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the adapters' weights under kohya key names, with each module's alpha (and
    dora_scale). `network_alpha`, when given, is checked against every non-LoCon module's alpha. `copy` makes
    each weight's copy (the trainer's background saving keeps them on the device, then copies them over at once:
    run/writer.py)."""
    architecture = model_family(family)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in adapter_modules(unet, adapter_name):
        alpha = _alpha(module, adapter_name)
        locon = _is_3x3(module.get_base_layer())
        if network_alpha is not None and not locon and not math.isclose(alpha, network_alpha):  # off block-wise
            raise ValueError(f"{name}: adapter alpha {alpha} is not {network_alpha}")
        modules[name] = _module_tensors(module, adapter_name, "", copy)
    if not modules:
        raise ValueError(f"the U-Net has no LoRA adapter named '{adapter_name}'")
    tensors = denoiser_kohya_tensors(architecture, unet, modules)
    for key, module in text_encoder_modules(family, text_encoders or [], adapter_name).items():
        tensors.update(_module_tensors(module, adapter_name, key, copy))
    return tensors


def text_encoder_modules(family: str, text_encoders: Sequence[Any], adapter_name: str = "default") -> dict[str, Any]:
    """{kohya module key: peft LoRA layer} of the text encoders' adapters (an encoder without one, FLUX.1's T5
    without train_t5xxl, has none)."""
    architecture = model_family(family)
    return {prefix + name.replace(".", "_"): module
            for prefix, encoder in text_key_prefixes(architecture.lora_text_prefixes(train_t5xxl=True), text_encoders,
                                                     architecture.t5_prefix)
            for name, module in adapter_modules(encoder, adapter_name)}


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


def unet_blocks(network: NetworkSettings, family: ModelFamily) -> tuple[ModelFamily, BlockRanks] | None:
    """(family, block-wise ranks) when the recipe sets block_dims, conv_block_dims or a learning-rate weight on a
    family with kohya blocks; else None."""
    if family.kohya_blocks is None:
        return None
    ranks = block_ranks(family.kohya_blocks, network.network_dim, network.network_alpha, network.conv_dim,
                        network.conv_alpha_value, dict(network.block_lists), block_lr(network, family))
    return None if ranks is None else (family, ranks)


def block_lr(network: NetworkSettings, family: ModelFamily) -> list[float] | None:
    """The learning-rate weight of each kohya block (training/blocks.py); None: no weights set, or no blocks."""
    if family.kohya_blocks is None:
        return None
    return block_lr_weights(family.kohya_blocks, network.down_lr_weight, network.mid_lr_weight,
                            network.up_lr_weight, network.block_lr_zero_threshold)


def add_network(base: BaseModel, network: NetworkSettings, seed: int,
                resume_from: dict[str, torch.Tensor] | None = None) -> None:
    """The recipe's adapters on the base model (float32 weights, init from the recipe's `seed`) with its dropouts,
    optionally set to the weights of a resume state."""
    from diffusers.training_utils import cast_training_params

    with torch.random.fork_rng(devices=[]):  # peft draws the LoRA init from the global RNG
        torch.manual_seed(derive_seed(seed, Stream.INIT))
        add_unet_lora(base.denoiser, network.network_dim, network.network_alpha, conv_dim=network.conv_dim,
                      conv_alpha=network.conv_alpha_value, use_dora=network.use_dora,
                      target_modules=lora_targets(base.architecture, base.denoiser, network.train_blocks),
                      algo=network.network_algo, factor=network.lokr_factor,
                      blocks=unet_blocks(network, base.architecture), locon=network.locon)
        if not network.network_train_unet_only:
            for encoder in lora_text_encoders(base, network.train_t5xxl):
                add_text_encoder_lora(encoder, network.network_dim, network.network_alpha, use_dora=network.use_dora,
                                      algo=network.network_algo, factor=network.lokr_factor)
    for module in (base.denoiser, *base.text_encoders):
        cast_training_params(module, dtype=torch.float32)
    add_dropout([base.denoiser, *base.text_encoders],
                DropoutSettings(network.network_dropout, network.rank_dropout, network.module_dropout))
    if resume_from is not None:
        named = trainable(base)
        with torch.no_grad():
            for name, tensor in resume_from.items():
                named[name].copy_(tensor)


def param_groups(base: BaseModel, text_encoder_lr: float | None, learning_rate: float | None = None,
                 block_weights: list[float] | None = None) -> list[Any]:
    """One group, or the U-Net's and the text encoders' (text_encoder_lr) as kohya's prepare_optimizer_params;
    with `block_weights` (kohya's block lr weights) one U-Net group per kohya block at learning_rate x its
    weight, named `unet_block<i>` as kohya's lr descriptions."""
    unet = [p for p in base.denoiser.parameters() if p.requires_grad]
    text = [p for e in base.text_encoders for p in e.parameters() if p.requires_grad]
    if block_weights is not None and learning_rate is not None:
        groups = _block_groups(base, learning_rate, block_weights)
        return groups + ([{"params": text, "lr": text_encoder_lr or learning_rate}] if text else [])
    if text_encoder_lr is None:
        return unet + text
    return [{"params": unet}, {"params": text, "lr": text_encoder_lr}]


def _block_groups(base: BaseModel, learning_rate: float, weights: list[float]) -> list[dict[str, Any]]:
    family = base.architecture
    namer = family.kohya_module_namer(base.denoiser)
    by_block: dict[int, list[torch.nn.Parameter]] = {}
    for name, module in adapter_modules(base.denoiser, "default"):
        index = family.kohya_block_index("lora_unet_" + namer(name).replace(".", "_"))
        by_block.setdefault(index, []).extend(p for p in module.parameters() if p.requires_grad)
    return [{"params": params, "lr": learning_rate * weights[index], "name": f"unet_block{index}"}
            for index, params in sorted(by_block.items()) if params]


def network_args(network: NetworkSettings) -> dict[str, str]:
    """kohya's ss_network_args: the `key=value` network_args as strings (LyCORIS' algo/dora_wd for DoRA, algo
    (and LoKr's factor) for LoHa / LoKr; FLUX.1's train_t5xxl as kohya's "True"; the block-wise lists
    comma-separated; the dropouts but network_dropout, which is kohya's own argument)."""
    args: dict[str, str] = {}
    if network.network_algo != "lora":
        args.update(algo=network.network_algo)
    if network.network_algo == "lokr":
        args.update(factor=str(network.lokr_factor))
    if network.train_t5xxl:
        args.update(train_t5xxl="True")
    if network.conv_dim is not None:
        args.update(conv_dim=str(network.conv_dim), conv_alpha=str(network.conv_alpha_value))
    if network.use_dora:
        args.update(algo="lora", dora_wd="True", wd_on_output="True")  # LyCORIS' create_network kwargs
    args.update(block_network_args({**network.block_lists, **network.lr_weights}))
    if network.block_lr_zero_threshold:
        args.update(block_lr_zero_threshold=str(network.block_lr_zero_threshold))
    args.update(block_network_args({"rank_dropout": network.rank_dropout, "module_dropout": network.module_dropout}))
    return args
