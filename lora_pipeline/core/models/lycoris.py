"""LoHa and LoKr (LyCORIS' `algo=loha` / `algo=lokr`, a recipe's `network_algo`): trained as peft's LoHa / LoKr
adapters on the same modules as the LoRA, written in the key layout LyCORIS writes, and read back from it.

Keys per module (the same `lora_unet_…` / `lora_te…_` names as the LoRA, network.py):

- LoHa: `.hada_w1_a` (out, r), `.hada_w1_b` (r, in·k·k), `.hada_w2_a`, `.hada_w2_b`, `.alpha`; the loaders
  (ComfyUI's weight_adapter/loha.py, A1111's network_hada.py) apply ΔW = (w1_a @ w1_b) * (w2_a @ w2_b) · alpha / r,
  with r the rows of `hada_w1_b`: exactly peft's delta.
- LoKr: `.lokr_w1` (or `.lokr_w1_a`/`_b`), `.lokr_w2` (or `.lokr_w2_a`/`_b`), `.alpha`; the loaders apply
  ΔW = kron(w1, w2) · alpha / r with r the rows of a `_b` factor, or · 1 where both factors are full matrices
  (no rank to divide by). peft scales every module by alpha / r, so a module whose two factors are full is written
  as LyCORIS writes it: the scale folded into `lokr_w2` and `alpha` = r (LyCORIS sets alpha to the rank there).

`load_lycoris` puts such a file back on a denoiser as a peft adapter (the evaluation grid: weighted and deleted
like a LoRA through diffusers' set_adapters / delete_adapters, since diffusers' load_lora_weights reads no LoHa and
no SD LoKr), each module's scale from the file's own alpha. Text-encoder modules are not loaded back (one line).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from lora_pipeline.core.models.families import ModelFamily
from lora_pipeline.core.models.kohya_names import UNET_PREFIX

ALGOS = ("lora", "loha", "lokr")
LOHA_SUFFIXES = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")
LOKR_SUFFIXES = (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b")
ALPHA = ".alpha"


def peft_config(algo: str, rank: int, alpha: float, targets: list[str], *, ranks: Mapping[str, int] | None = None,
                alphas: Mapping[str, float] | None = None, factor: int = -1) -> Any:
    """peft's LoHaConfig / LoKrConfig of LyCORIS' defaults (no Tucker decomposition, LoKr's w1 a full matrix)."""
    from peft import LoHaConfig, LoKrConfig

    common = dict(r=rank, alpha=alpha, target_modules=targets, rank_pattern=dict(ranks or {}),
                  alpha_pattern=dict(alphas or {}), use_effective_conv2d=False)
    if algo == "loha":
        return LoHaConfig(**common, init_weights=True)
    if algo == "lokr":  # LyCORIS' init: w1 random, w2 (its second factor) zero
        return LoKrConfig(**common, decompose_both=False, decompose_factor=factor, init_weights="lycoris")
    raise ValueError(f"network_algo {algo!r} is not a LyCORIS algorithm of this trainer ({', '.join(ALGOS[1:])})")


def is_lycoris_layer(module: Any) -> bool:
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer

    return isinstance(module, LoHaLayer | LoKrLayer)


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().clone()


def module_tensors(module: Any, adapter: str, key: str) -> dict[str, torch.Tensor]:
    """{key + suffix: tensor} of one peft LoHa / LoKr module in LyCORIS' layout."""
    from peft.tuners.loha import LoHaLayer

    rank, alpha = module.r[adapter], float(module.alpha[adapter])
    if not math.isclose(module.scaling[adapter], alpha / rank):
        raise ValueError(f"{key}: only the plain scale alpha/rank has a LyCORIS form")
    if isinstance(module, LoHaLayer):
        if adapter in module.hada_t1:
            raise ValueError(f"{key}: a Tucker-decomposed LoHa is not written")
        out = {key + suffix: _copy(getattr(module, suffix[1:])[adapter]) for suffix in LOHA_SUFFIXES}
        return out | {key + ALPHA: torch.tensor(alpha, dtype=torch.float32)}
    if adapter in module.lokr_t2:
        raise ValueError(f"{key}: a Tucker-decomposed LoKr is not written")
    out = {key + suffix: _copy(getattr(module, suffix[1:])[adapter]) for suffix in LOKR_SUFFIXES
           if adapter in getattr(module, suffix[1:])}
    if key + ".lokr_w1" in out and key + ".lokr_w2" in out:  # no rank: the loaders apply scale 1
        out[key + ".lokr_w2"] = out[key + ".lokr_w2"] * (alpha / rank)
        alpha = float(rank)
    return out | {key + ALPHA: torch.tensor(alpha, dtype=torch.float32)}


def file_algo(tensors: Mapping[str, torch.Tensor]) -> str:
    """"loha", "lokr" or "lora": which algorithm a kohya-format file's keys are."""
    if any(k.endswith(LOHA_SUFFIXES) for k in tensors):
        return "loha"
    if any(k.endswith(LOKR_SUFFIXES) for k in tensors):
        return "lokr"
    return "lora"


def _module_rank(algo: str, tensors: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> int:
    """The peft rank that gives the module's tensors the file's shapes (LoKr: one that makes w2 full where the
    file's w2 is full)."""
    if algo == "loha":
        return tensors[key + ".hada_w1_b"].shape[0]
    if key + ".lokr_w2_b" in tensors:
        return tensors[key + ".lokr_w2_b"].shape[0]
    return max(shape[:2])  # peft takes a full w2 when rank >= max(w2's sides) / 2


def _module_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted({k[:-len(ALPHA)] for k in tensors if k.endswith(ALPHA)})


def kohya_module_paths(family: ModelFamily, denoiser: Any) -> dict[str, str]:
    """{kohya module key (`lora_unet_…`): the denoiser's module path} of every Linear / Conv2d of a per-module
    family (SD 1.x, SDXL), a module wrapped by a peft adapter included (by its own path, not its base layer's)."""
    namer = family.kohya_module_namer(denoiser)
    paths = [name.removesuffix(".base_layer") for name, module in denoiser.named_modules()  # a wrapped one: its own
             if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and ".lora_" not in name]
    found = {}
    for name in paths:
        try:
            found[UNET_PREFIX + namer(name).replace(".", "_")] = name
        except ValueError:  # a module kohya's names leave out (SDXL's conv_in): never a LoRA module
            continue
    return found


def load_lycoris(denoiser: Any, family: ModelFamily, tensors: Mapping[str, torch.Tensor], adapter_name: str,
                 metadata: Mapping[str, str]) -> None:
    """Put a LoHa / LoKr file's modules on `denoiser` as peft adapter `adapter_name` (through diffusers'
    add_adapter, so pipelines weigh and delete it like a loaded LoRA). A module that is not the denoiser's (a
    text encoder's) is a ValueError."""
    kohya_names = kohya_module_paths(family, denoiser)
    algo = file_algo(tensors)
    args = json.loads(metadata.get("ss_network_args") or "{}")
    factor = int(args.get("factor", -1))
    modules = dict(denoiser.named_modules())
    targets, ranks, alphas = [], {}, {}
    for key in _module_keys(tensors):
        if key not in kohya_names:
            raise ValueError(f"{key}: only the denoiser's LoHa/LoKr modules are loaded back, not the text "
                             "encoders'")
        name = kohya_names[key]
        pattern = re.escape(name)  # peft matches a pattern against the module path's end
        targets.append(name)
        ranks[pattern] = _module_rank(algo, tensors, key, tuple(modules[name].weight.shape))
        # the loaders' scale: the file's alpha over the rank, or 1 where LoKr's two factors are full matrices
        full = key + ".lokr_w1" in tensors and key + ".lokr_w2" in tensors
        alphas[pattern] = float(ranks[pattern]) if full else float(tensors[key + ALPHA])
    denoiser.add_adapter(peft_config(algo, 1, 1.0, targets, ranks=ranks, alphas=alphas, factor=factor),
                         adapter_name=adapter_name)
    modules = dict(denoiser.named_modules())  # now the peft layers around them
    with torch.no_grad():
        for key in _module_keys(tensors):
            module = modules[kohya_names[key]]
            suffixes = LOHA_SUFFIXES if algo == "loha" else LOKR_SUFFIXES
            for suffix in suffixes:
                if key + suffix in tensors:
                    target = getattr(module, suffix[1:])[adapter_name]
                    target.copy_(tensors[key + suffix].reshape(target.shape))
