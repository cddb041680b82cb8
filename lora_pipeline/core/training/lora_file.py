"""LoRA files in kohya's format, so diffusers' `load_lora_weights`, A1111 and ComfyUI all load them.

Keys are `lora_unet_<module path, dots as underscores>.{lora_down.weight, lora_up.weight, alpha}`, where
`alpha` holds the recipe's real network_alpha (the loaders scale by alpha / rank, as training did). SD 1.x
LoRAs use the diffusers module paths (kohya trains SD 1.x on a diffusers-layout U-Net); SDXL LoRAs use the
original sgm names (`input_blocks_4_1_…`, `middle_block_1_…`, `output_blocks_…`) that kohya's SDXL U-Net
has and A1111/ComfyUI expect. The header carries kohya's `ss_*` keys, `modelspec.*` and our
`lora_pipeline.*` provenance keys, all as strings.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_bytes
from lora_pipeline.core.hashing import canonical_json, sha256_bytes
from lora_pipeline.core.training.recipe import Recipe

# kohya's default U-Net targets: every Linear / 1x1 Conv2d inside the transformer blocks (Transformer2DModel).
KOHYA_UNET_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
PREFIX = "lora_unet_"
BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURE = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
# kohya's modelspec: SDXL LoRAs are in sgm (Stability's) naming, SD 1.x LoRAs in diffusers naming.
IMPLEMENTATION = {"sd15": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}

_DOWN = re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)")
_UP = re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.attentions\.0\.(.+)")


def add_unet_lora(unet: Any, rank: int, alpha: float, adapter_name: str = "default") -> None:
    """Wrap kohya's target modules in a peft LoRA: down kaiming-uniform, up zero (as kohya), scale alpha/rank."""
    from peft import LoraConfig  # imported here: peft takes seconds to import, provenance never needs it
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=KOHYA_UNET_TARGET_MODULES, init_lora_weights=True)
    unet.add_adapter(config, adapter_name=adapter_name)
    # peft casts each LoRA input to the (float32) LoRA weight dtype: under bf16 autocast that is a full copy of
    # every activation, cast straight back by autocast for the matmul (30% of H100 time in a profile). The
    # matmul sees the same bf16 operands without it; in float32 training it was a no-op anyway.
    for module in unet.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False


def sgm_module_name(diffusers_name: str, layers_per_block: int) -> str:
    """The SDXL sgm path of a module inside a diffusers U-Net's attention blocks.

    sgm numbers the U-Net's sub-blocks flat: input_blocks[0] is conv_in, then each down level contributes
    `layers_per_block` (resnet, attention) pairs and one downsampler; output_blocks hold `layers_per_block
    + 1` (resnet, attention[, upsampler]) entries per up level; middle_block is (resnet, attention, resnet).
    The attention is always sub-module 1. This is the inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers`.
    """
    per_level = layers_per_block + 1
    if m := _DOWN.fullmatch(diffusers_name):
        return f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
    if m := _UP.fullmatch(diffusers_name):
        return f"output_blocks.{int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
    if m := _MID.fullmatch(diffusers_name):
        return f"middle_block.1.{m[1]}"
    raise ValueError(f"no sgm name for U-Net module '{diffusers_name}' (only attention blocks carry LoRA)")


def kohya_state_dict(
    unet: Any, family: str, network_alpha: float, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the adapter's weights under kohya key names, plus each module's alpha."""
    from peft.tuners.lora import LoraLayer

    layers_per_block = unet.config.layers_per_block
    if family == "sdxl" and not isinstance(layers_per_block, int):
        raise ValueError("sgm naming needs one layers_per_block for every level")
    tensors: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        if not math.isclose(module.lora_alpha[adapter_name], network_alpha):
            raise ValueError(f"{name}: adapter alpha {module.lora_alpha[adapter_name]} is not {network_alpha}")
        plain_scale = module.lora_alpha[adapter_name] / module.r[adapter_name]
        if module.use_dora.get(adapter_name) or not math.isclose(module.scaling[adapter_name], plain_scale):
            raise ValueError(f"{name}: only plain LoRA (scale alpha/rank, no DoRA/rsLoRA) has a kohya form")
        path = sgm_module_name(name, layers_per_block) if family == "sdxl" else name
        key = PREFIX + path.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = module.lora_A[adapter_name].weight.detach().cpu().clone()
        tensors[f"{key}.lora_up.weight"] = module.lora_B[adapter_name].weight.detach().cpu().clone()
        tensors[f"{key}.alpha"] = torch.tensor(float(network_alpha), dtype=torch.float32)
    if not tensors:
        raise ValueError(f"the U-Net has no LoRA adapter named '{adapter_name}'")
    return tensors


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """kohya's `sshs_model_hash` / `sshs_legacy_hash` (sd-webui-additional-networks' hashes of the LoRA itself).

    Computed as kohya does: over the file that the tensors and only the `ss_*` metadata would make; the
    model hash covers the tensor bytes after the header, the legacy hash 64 KiB at offset 1 MiB.
    """
    data = safetensors.torch.save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(data[:8], "little")
    legacy = sha256_bytes(data[0x100000:0x110000])[:8]
    return {"sshs_model_hash": sha256_bytes(data[header:]), "sshs_legacy_hash": legacy}


def sorted_header(data: bytes) -> bytes:
    """The same safetensors file with its JSON header keys (and metadata keys) in sorted order.

    safetensors writes the metadata from a Rust HashMap, whose order changes from call to call; sorting makes
    equal tensors and metadata give byte-identical files (reproducible runs, resume == uninterrupted run).
    The header is padded with spaces to a multiple of 8 bytes, as safetensors itself does.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size:]


def save_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write a safetensors LoRA atomically (temp file beside it, then rename); return the file's sha256.

    The sshs_* hashes are added to the metadata here, since they depend on the tensors.
    """
    wrong = sorted(k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str))
    if wrong:
        raise TypeError(f"LoRA metadata values must be strings: {', '.join(map(str, wrong))}")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    data = sorted_header(safetensors.torch.save(tensors, metadata={**metadata, **addnet_hashes(tensors, metadata)}))
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def read_lora_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a safetensors file (the tensors are not read)."""
    if not path.is_file():
        raise UserError("file not found", path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError:
        raise UserError("not a safetensors file (its header cannot be read)", path) from None


def tensors_match_header(path: Path) -> bool | None:
    """Whether the file's tensors still give the `sshs_model_hash` in its header (None: the header has none).

    The hash is recomputed as `addnet_hashes` (kohya) computes it when the file is written, so a changed
    tensor byte anywhere in the file is caught even though the header still reads as before.
    """
    recorded = read_lora_metadata(path).get("sshs_model_hash")
    if recorded is None:
        return None
    try:
        tensors = safetensors.torch.load_file(str(path))
    except SafetensorError:
        raise UserError("not a safetensors file (its tensors cannot be read)", path) from None
    return addnet_hashes(tensors, read_lora_metadata(path))["sshs_model_hash"] == recorded


@dataclass(frozen=True)
class LoraProvenance:
    """Where a LoRA came from; written as `lora_pipeline.*` header keys."""

    dataset_version: str
    manifest_root: str
    spec_sha256: str
    base_model_source: str  # the resolved folder or hub id
    base_model_hash: str  # models.base_model_hash(base_model_source)
    code_commit: str  # codeversion.code_version()
    mlflow_run_id: str


def _model_name(base_model: str) -> str:
    """kohya records a local model by its file/folder name and anything else (a hub id) as given."""
    path = Path(base_model).expanduser()
    return path.name if path.exists() else base_model


def _flag(value: bool) -> str:
    return str(bool(value))  # kohya writes Python's True / False


def build_metadata(
    *,
    recipe: Recipe,
    provenance: LoraProvenance,
    epoch: int,
    steps: int,
    max_train_steps: int,
    num_train_images: int,
    num_batches_per_epoch: int,
    tag_frequency: dict[str, dict[str, int]],
    dataset_dirs: dict[str, dict[str, int]],
    training_started_at: float,
    prediction_type: str = "epsilon",
    num_reg_images: int = 0,
    reg_dataset_dirs: dict[str, dict[str, int]] | None = None,
) -> dict[str, str]:
    """Header metadata for one saved epoch: kohya ss_* keys, modelspec.* and lora_pipeline.* (all strings).

    `num_train_images` counts repeats (as kohya does); `tag_frequency` is {image dir: {tag: count}} and
    `dataset_dirs` {image dir: {"n_repeats": r, "img_count": n}}, the image dir being e.g. "10_hdaesth".
    `training_started_at` is a unix timestamp, `steps` the optimizer steps done when this epoch was saved.
    """
    family = recipe.model_family
    output_name = f"{provenance.dataset_version}-{recipe.name}"
    reso = recipe.resolution
    started = datetime.datetime.fromtimestamp(int(training_started_at), tz=datetime.UTC)
    ss = {
        "ss_training_started_at": training_started_at,
        "ss_output_name": output_name,
        "ss_learning_rate": recipe.learning_rate,
        "ss_unet_lr": recipe.learning_rate,
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": num_reg_images,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": recipe.epochs,
        "ss_epoch": epoch,
        "ss_steps": steps,
        "ss_max_train_steps": max_train_steps,
        "ss_gradient_checkpointing": _flag(recipe.gradient_checkpointing),
        "ss_gradient_accumulation_steps": 1,
        "ss_lr_warmup_steps": recipe.lr_warmup_steps,
        "ss_lr_scheduler": recipe.lr_scheduler,
        "ss_network_module": "networks.lora",
        "ss_network_dim": recipe.network_dim,
        "ss_network_alpha": float(recipe.network_alpha),
        "ss_network_train_unet_only": _flag(recipe.network_train_unet_only),
        "ss_mixed_precision": recipe.mixed_precision,
        "ss_full_fp16": _flag(False),
        "ss_v2": _flag(False),
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_sd_model_name": _model_name(recipe.base_model),
        "ss_cache_latents": _flag(recipe.cache_latents),
        "ss_seed": recipe.seed,
        "ss_noise_offset": recipe.noise_offset,
        "ss_min_snr_gamma": recipe.min_snr_gamma,
        "ss_optimizer": f"{recipe.optimizer}(weight_decay={recipe.weight_decay})",
        "ss_batch_size_per_device": recipe.train_batch_size,
        "ss_total_batch_size": recipe.train_batch_size,
        "ss_resolution": (reso, reso),
        "ss_enable_bucket": _flag(recipe.enable_bucket),
        "ss_min_bucket_reso": recipe.min_bucket_reso,
        "ss_max_bucket_reso": recipe.max_bucket_reso,
        "ss_shuffle_caption": _flag(recipe.shuffle_caption),
        "ss_keep_tokens": recipe.keep_tokens,
        "ss_caption_dropout_rate": recipe.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": recipe.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": recipe.caption_tag_dropout_rate,
        "ss_flip_aug": _flag(recipe.flip_aug),
        "ss_random_crop": _flag(recipe.random_crop),
        "ss_masked_loss": _flag(recipe.masked_loss),
        "ss_prior_loss_weight": recipe.prior_loss_weight,
        "ss_dataset_dirs": json.dumps(dataset_dirs, sort_keys=True),
        "ss_reg_dataset_dirs": json.dumps(reg_dataset_dirs or {}, sort_keys=True),
        "ss_tag_frequency": json.dumps(tag_frequency, sort_keys=True, ensure_ascii=False),
    }
    modelspec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURE[family],
        "modelspec.implementation": IMPLEMENTATION[family],
        "modelspec.title": f"{output_name}-e{epoch:03d}",
        "modelspec.resolution": f"{reso}x{reso}",
        "modelspec.date": started.isoformat(),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }
    ours = {
        "lora_pipeline.dataset_version": provenance.dataset_version,
        "lora_pipeline.manifest_root": provenance.manifest_root,
        "lora_pipeline.spec_sha256": provenance.spec_sha256,
        "lora_pipeline.recipe": recipe.name,
        "lora_pipeline.recipe_sha256": recipe.sha256,
        "lora_pipeline.recipe_resolved": canonical_json(recipe.resolved()),
        "lora_pipeline.base_model": recipe.base_model,
        "lora_pipeline.base_model_source": provenance.base_model_source,
        "lora_pipeline.base_model_hash": provenance.base_model_hash,
        "lora_pipeline.code_commit": provenance.code_commit,
        "lora_pipeline.mlflow_run_id": provenance.mlflow_run_id,
        "lora_pipeline.epoch": epoch,
    }
    return {k: str(v) for k, v in {**ss, **modelspec, **ours}.items()}
