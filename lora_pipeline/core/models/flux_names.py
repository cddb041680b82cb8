"""FLUX.1 LoRA key names: diffusers' modules under kohya's (Black Forest Labs') names, and back.

kohya's sd-scripts (networks/lora_flux.py) trains FLUX.1 in BFL's layout, where a double block's q, k and v are
one Linear (`img_attn.qkv`, `txt_attn.qkv`) and a single block's q, k, v and MLP input are one (`linear1`);
diffusers' FluxTransformer2DModel has them as separate Linears, each with its own LoRA here. Such parts are
written as kohya's `split_qkv` writes them: down the parts' downs stacked [n*r x in], up block-diagonal
[sum(out) x n*r], one LoRA of the fused Linear (of rank n*r) to loaders in BFL's layout (kohya's own), which
diffusers' `_convert_kohya_flux_lora_to_diffusers` splits back into its parts. Its alpha is n * alpha, so that
loaders' scale alpha / rank of the file stays the parts' alpha / r; kohya's own split_qkv keeps alpha and so loads
at 1/n of the trained strength (sd-scripts issue #2204).

Keys: `lora_unet_double_blocks_{i}_…` / `lora_unet_single_blocks_{i}_…` (the transformer), `lora_te1_…` (CLIP-L,
with transformers 4's `text_model` level, as the SD keys) and `lora_te3_…` (T5), then `.lora_down.weight`,
`.lora_up.weight`, `.alpha`. Modules are named as FluxPipeline's LoRA state dicts name them: component, then
its module path (`transformer.transformer_blocks.0.attn.to_q`, `text_encoder.encoder.layers.0.self_attn.q_proj`
as transformers 5's CLIP names it, `text_encoder_2.encoder.block.0.layer.0.SelfAttention.q`).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import torch

from lora_pipeline.core.models.kohya_names import TEXT_MODEL, UNET_PREFIX

TRANSFORMER, CLIP_L, T5 = "transformer", "text_encoder", "text_encoder_2"  # FluxPipeline's component names
CLIP_PREFIX, T5_PREFIX = "lora_te1_", "lora_te3_"  # kohya's LORA_PREFIX_TEXT_ENCODER_CLIP / _T5
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"

# Each BFL Linear of a block that kohya's LoRA trains (every Linear of DoubleStreamBlock / SingleStreamBlock, the
# modulations included), with the diffusers modules it holds in the order of its output rows.
DOUBLE_BLOCK = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
# train_blocks: {BFL block list: (diffusers block list, its modules, the transformer's config field counting them)}
BLOCKS = {
    "double_blocks": ("transformer_blocks", DOUBLE_BLOCK, "num_layers"),
    "single_blocks": ("single_transformer_blocks", SINGLE_BLOCK, "num_single_layers"),
}
TRAIN_BLOCKS = {"all": ("double_blocks", "single_blocks"), "double": ("double_blocks",), "single": ("single_blocks",)}

_DIFFUSERS_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")
_KOHYA_BLOCK = re.compile(r"(double_blocks|single_blocks)_(\d+)_(\w+)")
# kohya's text-encoder targets: CLIPAttention / CLIPMLP and T5Attention / T5DenseGatedActDense, whose Linears
# are the last part of the path (so `q_proj`, `wi_0` keep their underscore).
_CLIP_MODULE = re.compile(r"encoder_layers_(\d+)_(self_attn|mlp)_(\w+)")
_T5_MODULE = re.compile(r"encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_(\w+)")


class LoraFactors(NamedTuple):
    """One module's LoRA: down is peft's lora_A [r x in], up its lora_B [out x r]; the scale is alpha / r."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float


def flux_target_modules(transformer: Any, train_blocks: str = "all") -> list[str]:
    """The FluxTransformer2DModel modules (peft `target_modules`) that kohya's default FLUX LoRA trains:
    every Linear of the double and / or single blocks (kohya's `train_blocks`: all, double or single)."""
    if train_blocks not in TRAIN_BLOCKS:
        raise ValueError(f"train_blocks must be one of {', '.join(TRAIN_BLOCKS)}, not '{train_blocks}'")
    targets: list[str] = []
    for blocks in TRAIN_BLOCKS[train_blocks]:
        diffusers_blocks, modules, count = BLOCKS[blocks]
        targets += [f"{diffusers_blocks}.{i}.{part}" for i in range(getattr(transformer.config, count))
                    for parts in modules.values() for part in parts]
    return targets


def _transformer_part(path: str) -> tuple[str, int, int]:
    """(kohya module name, this part's index, its number of parts) of a diffusers transformer module path."""
    if m := _DIFFUSERS_BLOCK.fullmatch(path):
        blocks = next(name for name, (diffusers, _, _) in BLOCKS.items() if diffusers == m[1])
        for name, parts in BLOCKS[blocks][1].items():
            if m[3] in parts:
                return f"{blocks}_{m[2]}_{name}", parts.index(m[3]), len(parts)
    raise ValueError(f"'{TRANSFORMER}.{path}' is no module that kohya's FLUX LoRA trains")


def _text_key(component: str, path: str) -> str:
    if component == CLIP_L:  # kohya's names keep the `text_model` level, which transformers 5's CLIP dropped
        level = "" if path.startswith("text_model.") else TEXT_MODEL
        return CLIP_PREFIX + level + path.replace(".", "_")
    if component == T5:
        return T5_PREFIX + path.replace(".", "_")
    raise ValueError(f"'{component}' is no FLUX component with kohya LoRA names")


def _fused(name: str, parts: list[LoraFactors]) -> LoraFactors:
    """kohya's split_qkv form of parts of one BFL Linear (see the module docstring)."""
    if len({(p.down.shape[0], float(p.alpha)) for p in parts}) > 1:
        raise ValueError(f"{name}: the parts of a fused module need one rank and one alpha")
    rank = parts[0].down.shape[0]
    up = parts[0].up.new_zeros(sum(p.up.shape[0] for p in parts), rank * len(parts))
    row = 0
    for i, part in enumerate(parts):
        up[row:row + part.up.shape[0], i * rank:(i + 1) * rank] = part.up
        row += part.up.shape[0]
    return LoraFactors(torch.cat([p.down for p in parts]), up, float(parts[0].alpha) * len(parts))


def flux_kohya_state_dict(tensors_by_module: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
                          ) -> dict[str, torch.Tensor]:
    """{kohya key: tensor} of LoRAs given per module as {module name: (lora_A, lora_B, alpha)}, the names as in
    the module docstring. Fused BFL modules need every one of their parts, at one rank and alpha."""
    parts_of: dict[str, list[LoraFactors | None]] = {}
    modules: dict[str, LoraFactors] = {}
    for module, factors in tensors_by_module.items():
        component, _, path = module.partition(".")
        if component != TRANSFORMER:
            modules[_text_key(component, path)] = LoraFactors(*factors)
            continue
        name, index, count = _transformer_part(path)
        parts_of.setdefault(name, [None] * count)[index] = LoraFactors(*factors)
    for name, parts in parts_of.items():
        if missing := [i for i, part in enumerate(parts) if part is None]:
            raise ValueError(f"{name}: a fused module needs all its parts, part(s) {missing} are missing")
        modules[UNET_PREFIX + name] = _fused(name, parts)
    tensors: dict[str, torch.Tensor] = {}
    for key, (down, up, alpha) in modules.items():
        tensors.update({key + DOWN: down, key + UP: up, key + ALPHA: torch.tensor(alpha, dtype=torch.float32)})
    return tensors


def _module_path(key: str) -> tuple[str, tuple[str, ...]]:
    """(component, its module paths) of a kohya module name: several paths for a fused BFL module."""
    if key.startswith(UNET_PREFIX) and (m := _KOHYA_BLOCK.fullmatch(key.removeprefix(UNET_PREFIX))):
        diffusers_blocks, modules, _ = BLOCKS[m[1]]
        if m[3] in modules:
            return TRANSFORMER, tuple(f"{diffusers_blocks}.{m[2]}.{part}" for part in modules[m[3]])
    if key.startswith(CLIP_PREFIX) and (m := _CLIP_MODULE.fullmatch(key.removeprefix(CLIP_PREFIX + TEXT_MODEL))):
        return CLIP_L, (f"encoder.layers.{m[1]}.{m[2]}.{m[3]}",)
    if key.startswith(T5_PREFIX) and (m := _T5_MODULE.fullmatch(key.removeprefix(T5_PREFIX))):
        return T5, (f"encoder.block.{m[1]}.layer.{m[2]}.{m[3]}.{m[4]}",)
    raise ValueError(f"'{key}' is no kohya FLUX LoRA module")


def _split(down: torch.Tensor, up: torch.Tensor, alpha: float, n: int) -> list[LoraFactors]:
    """The n parts of a fused module. Every part but the last is the fused Linear's input wide (the hidden size:
    q, k, v), the last takes the rest (v, or the MLP of linear1). kohya's split_qkv form (a block-diagonal up)
    splits into its parts; a plain LoRA of the fused Linear (kohya's default, one down) gives each part that down
    and its rows of up. Either way each part's delta is its rows of the file's."""
    sizes = [down.shape[1]] * (n - 1) + [up.shape[0] - down.shape[1] * (n - 1)]
    rows = torch.split(up, sizes)
    rank = down.shape[0] // n
    if down.shape[0] % n == 0 and all(not block.any() for i, part in enumerate(rows)
                                      for j, block in enumerate(torch.split(part, rank, dim=1)) if j != i):
        return [LoraFactors(down[i * rank:(i + 1) * rank], part[:, i * rank:(i + 1) * rank].contiguous(), alpha / n)
                for i, part in enumerate(rows)]
    return [LoraFactors(down, part, alpha) for part in rows]


def flux_from_kohya(tensors: dict[str, torch.Tensor]) -> dict[str, LoraFactors]:
    """{module name: its LoRA} of a kohya FLUX LoRA's tensors (the inverse of `flux_kohya_state_dict`), each with
    the delta that loaders apply (for kohya's own split_qkv files 1/n of what kohya trained, see above); a module
    without `.alpha` has alpha = rank, as kohya and diffusers load it."""
    keys = {key.removesuffix(suffix) for key in tensors for suffix in (DOWN, UP, ALPHA) if key.endswith(suffix)}
    if strays := sorted(set(tensors) - {key + suffix for key in keys for suffix in (DOWN, UP, ALPHA)}):
        raise ValueError(f"not kohya LoRA tensors: {', '.join(strays)}")
    modules: dict[str, LoraFactors] = {}
    for key in sorted(keys):
        component, paths = _module_path(key)
        if key + DOWN not in tensors or key + UP not in tensors:
            raise ValueError(f"{key}: lora_down and lora_up are both needed")
        down, up = tensors[key + DOWN], tensors[key + UP]
        alpha = float(tensors[key + ALPHA]) if key + ALPHA in tensors else float(down.shape[0])
        parts = _split(down, up, alpha, len(paths)) if len(paths) > 1 else [LoraFactors(down, up, alpha)]
        modules.update({f"{component}.{path}": part for path, part in zip(paths, parts, strict=True)})
    return modules
