"""LoRA files in kohya's format, so diffusers' `load_lora_weights`, A1111 and ComfyUI all load them.

Keys are `lora_unet_<module path, dots as underscores>.{lora_down.weight, lora_up.weight, alpha}` (and
`lora_te_…` / `lora_te1_…`, `lora_te2_…` for text encoders, `.dora_scale` for DoRA; network.py; LoHa / LoKr
write LyCORIS' `.hada_…` / `.lokr_…` keys on the same names, core/models/lycoris.py), where `alpha` holds the
recipe's real alpha (the loaders scale by alpha / rank, as training did). SD 1.x LoRAs use the
diffusers module paths (kohya trains SD 1.x on a diffusers-layout U-Net); SDXL LoRAs use the original sgm
names (`input_blocks_4_1_…`, `middle_block_1_…`, `output_blocks_…`) that kohya's SDXL U-Net has and
A1111/ComfyUI expect. The header carries kohya's `ss_*` keys, `modelspec.*` and our
`lora_pipeline.*` provenance keys, all as strings.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_stream
from lora_pipeline.core.hashing import canonical_json, sha256_bytes, sha256_file
from lora_pipeline.core.models.families import model_family
from lora_pipeline.core.models.families.base import RECTIFIED_FLOW
from lora_pipeline.core.models.families.sdxl import sgm_module_name  # noqa: F401 (re-exported: the file format's names)
from lora_pipeline.core.training.kohya.network import (  # noqa: F401 (re-exported: the file format's names)
    KOHYA_UNET_TARGET_MODULES,
    add_unet_lora,
    kohya_state_dict,
    network_args,
)
from lora_pipeline.core.training.optimizer_args import MAX_GRAD_NORM, OPTIMIZER_CLASSES, kohya_optimizer_args
from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline.core.training.recipe_groups import OptimizerSettings

LEGACY_WINDOW = (0x100000, 0x110000)  # the bytes of kohya's sshs_legacy_hash: 64 KiB at 1 MiB
# modelspec.prediction_type of a training prediction type (the scheduler's, or the flow objective's name)
MODELSPEC_PREDICTION = {"v_prediction": "v", RECTIFIED_FLOW: "flow"}


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """kohya's `sshs_model_hash` / `sshs_legacy_hash` (sd-webui-additional-networks' hashes of the LoRA itself).

    Computed as kohya does: over the file that the tensors and only the `ss_*` metadata would make; the
    model hash covers the tensor bytes after the header, the legacy hash 64 KiB at offset 1 MiB.
    """
    data = safetensors.torch.save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(data[:8], "little")
    legacy = sha256_bytes(data[slice(*LEGACY_WINDOW)])[:8]
    return {"sshs_model_hash": sha256_bytes(data[header:]), "sshs_legacy_hash": legacy}


def _split(data: bytes) -> tuple[dict[str, Any], memoryview]:
    """A safetensors file's parsed JSON header and its tensor bytes (a view, not a copy)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]), memoryview(data)[8 + size:]


def _header_bytes(header: dict[str, Any], sort_keys: bool = True) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces to a multiple of 8 bytes as safetensors pads it
    (serde_json's compact form: the same escapes as json.dumps without ensure_ascii). Sorted: safetensors writes
    the metadata from a Rust HashMap, whose order changes from call to call; sorted keys make equal tensors and
    metadata give byte-identical files (reproducible runs, resume == uninterrupted run)."""
    text = json.dumps(header, sort_keys=sort_keys, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _addnet_hashes_of(header: dict[str, Any], body: memoryview) -> dict[str, str]:
    """`addnet_hashes` from a file's header and tensor bytes, without serializing the tensors again: the file of
    the `ss_*` metadata alone has the same tensor bytes behind a header of another length."""
    ss_only = {**header, "__metadata__": {k: v for k, v in header.get("__metadata__", {}).items()
                                          if k.startswith("ss_")}}
    head = _header_bytes(ss_only, sort_keys=False)
    lo, hi = LEGACY_WINDOW
    window = head[lo:hi] + bytes(body[max(lo - len(head), 0):max(hi - len(head), 0)])
    return {"sshs_model_hash": hashlib.sha256(body).hexdigest(), "sshs_legacy_hash": sha256_bytes(window)[:8]}


@dataclass(frozen=True)
class PreparedLora:
    """A LoRA file's bytes as `save_lora` writes them: the sorted header and the tensor bytes, and its sha256."""

    head: bytes
    body: memoryview
    sha256: str

    def write(self, f: BinaryIO) -> None:
        f.write(self.head)
        f.write(self.body)


def prepare_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> PreparedLora:
    """The file `save_lora` writes, in memory. The sshs_* hashes are added to the metadata here, since they depend
    on the tensors. The tensors are serialized once and never copied whole again (an SDXL epoch file is hundreds
    of MB: with a second serialization for the hashes and copies for the sorted header it took 2.7 s of the
    writer's time on an H100 host)."""
    wrong = sorted(k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str))
    if wrong:
        raise TypeError(f"LoRA metadata values must be strings: {', '.join(map(str, wrong))}")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    header, body = _split(safetensors.torch.save(tensors, metadata=metadata))
    header["__metadata__"] = {**header.get("__metadata__", {}), **_addnet_hashes_of(header, body)}
    head = _header_bytes(header)
    digest = hashlib.sha256(head)
    digest.update(body)
    return PreparedLora(head, body, digest.hexdigest())


def write_lora(path: Path, prepared: PreparedLora) -> None:
    """Write a prepared LoRA atomically (temp file beside it, then rename); an identical file is left alone."""
    size = len(prepared.head) + len(prepared.body)
    if not (path.is_file() and path.stat().st_size == size and sha256_file(path) == prepared.sha256):
        atomic_write_stream(path, prepared.write)


def save_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write a safetensors LoRA atomically (`prepare_lora`, `write_lora`); return the file's sha256."""
    prepared = prepare_lora(tensors, metadata)
    write_lora(path, prepared)
    return prepared.sha256


def read_lora_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a safetensors file (the tensors are not read)."""
    if not path.is_file():
        raise UserError("file not found", path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError:
        raise UserError("not a safetensors file (its header cannot be read)", path) from None


EPOCH_IN_NAME = re.compile(r"-e(\d{3,})\.safetensors")


def header_epoch(meta: dict[str, str]) -> int | None:
    """The epoch a file's own header records (`lora_pipeline.epoch`, else kohya's `ss_epoch`); None without one."""
    found = meta.get("lora_pipeline.epoch", meta.get("ss_epoch"))
    return int(found) if found is not None and found.isdigit() else None


def epoch_mismatch(path: Path, meta: dict[str, str]) -> str | None:
    """A finding when the epoch in the file's name (`...-eNNN.safetensors`) is not the epoch its header records,
    or the header's two epoch keys disagree (a renamed or swapped file); None when they agree or there is no
    epoch to compare. A file's name is only a label: its weights are the header's epoch."""
    recorded = {meta[k] for k in ("lora_pipeline.epoch", "ss_epoch") if k in meta}
    if len(recorded) > 1:
        return (f"its header's epoch keys disagree (lora_pipeline.epoch {meta['lora_pipeline.epoch']}, "
                f"ss_epoch {meta['ss_epoch']})")
    named, held = EPOCH_IN_NAME.search(path.name), header_epoch(meta)
    if named is None or held is None or int(named[1]) == held:
        return None
    return f"its name says epoch {int(named[1])} but its header holds epoch {held} (renamed?)"


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


def _optimizer(settings: OptimizerSettings) -> str:
    """kohya's ss_optimizer: the optimizer's class as `module.Class` and its arguments (`optimizer_args` as kohya
    joins them), e.g. `torch.optim.adamw.AdamW(weight_decay=0.01)`."""
    extra = {"Adafactor": {"relative_step": settings.adafactor_relative_step},
             "DAdaptAdamW": {"decouple": True}}.get(settings.optimizer, {})
    args = {**extra, "weight_decay": settings.weight_decay, **(settings.optimizer_args or {})}
    return f"{OPTIMIZER_CLASSES[settings.optimizer]}({kohya_optimizer_args(args)})"


def session_id(mlflow_run_id: str, training_started_at: float, output_name: str) -> int:
    """kohya's ss_session_id, an integer in [0, 2**32) naming the run an epoch file came from: kohya draws it at
    random per start; here it is derived from the run, so a resumed run keeps it and its files stay reproducible."""
    return int(sha256_bytes(f"{mlflow_run_id}|{training_started_at}|{output_name}".encode())[:8], 16)


# kohya's train_network.py keys for options this pipeline does not have: the value kohya writes when the option is
# not given (str() of the argparse default)
NOT_APPLICABLE = {
    "ss_network_dropout": None, "ss_clip_skip": None, "ss_max_token_length": None, "ss_lowram": False,
    "ss_adaptive_noise_scale": None, "ss_training_comment": None, "ss_face_crop_aug_range": None,
    "ss_scale_weight_norms": None, "ss_noise_offset_random_strength": False,
    "ss_ip_noise_gamma_random_strength": False, "ss_fp8_base_unet": False, "ss_validation_seed": None,
    "ss_max_validation_steps": None, "ss_validate_every_n_epochs": None, "ss_validate_every_n_steps": None,
    "ss_resize_interpolation": None, "ss_color_aug": False, "ss_bucket_no_upscale": False,
}


def _sampling_keys(recipe: Recipe) -> dict[str, float]:
    """The ss_* keys of the parameters a U-Net timestep_sampling mode reads (kohya's names of them)."""
    if recipe.timestep_sampling == "sigmoid":
        return {"ss_sigmoid_scale": recipe.sigmoid_scale}
    if recipe.timestep_sampling == "logit_normal":
        return {"ss_logit_mean": recipe.logit_mean, "ss_logit_std": recipe.logit_std}
    return {}


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
    flip_aug: bool | None = None,
    architecture: str | None = None,
    gradient_accumulation_steps: int | None = None,
    training_finished_at: float | None = None,
    num_validation_images: int = 0,
    bucket_info: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Header metadata for one saved epoch: kohya ss_* keys, modelspec.* and lora_pipeline.* (all strings).

    `num_train_images` counts repeats (as kohya does); `tag_frequency` is {image dir: {tag: count}} and
    `dataset_dirs` {image dir: {"n_repeats": r, "img_count": n}}, the image dir being e.g. "10_hdaesth".
    `training_started_at` is a unix timestamp, `steps` the optimizer steps done when this epoch was saved.
    `flip_aug`: whether the run mirrored images (the recipe's or the dataset spec's; default the recipe's).
    `gradient_accumulation_steps`: the accumulation the run had (default the recipe's; see
    `data.accumulation_in_effect`).
    `training_finished_at`: the unix time the file is saved (kohya's ss_training_finished_at; default
    `training_started_at`). `num_validation_images` (held out, with repeats) and `bucket_info`
    (`TrainingData.bucket_info`) are kohya's ss_num_validation_images and ss_bucket_info.
    `architecture`: modelspec.architecture (default the family's; FLUX.1's names [dev] or [schnell]). A family
    trained on the rectified-flow objective also gets kohya's FLUX keys (ss_guidance_scale, ss_timestep_sampling,
    ...); `prediction_type` is then the objective's name.
    """
    family = model_family(recipe.model_family)
    output_name = f"{provenance.dataset_version}-{recipe.name}"
    reso = recipe.resolution
    started = datetime.datetime.fromtimestamp(int(training_started_at), tz=datetime.UTC)
    ss = {
        **NOT_APPLICABLE,
        "ss_session_id": session_id(provenance.mlflow_run_id, training_started_at, output_name),
        "ss_training_started_at": training_started_at,
        "ss_training_finished_at": training_started_at if training_finished_at is None else training_finished_at,
        "ss_output_name": output_name,
        "ss_learning_rate": recipe.learning_rate,
        "ss_unet_lr": recipe.learning_rate,
        "ss_text_encoder_lr": None if recipe.network_train_unet_only else (recipe.text_encoder_lr or
                                                                            recipe.learning_rate),
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": num_reg_images,
        "ss_num_validation_images": num_validation_images,
        "ss_validation_split": recipe.validation_split,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": recipe.epochs,
        "ss_epoch": epoch,
        "ss_steps": steps,
        "ss_max_train_steps": max_train_steps,
        "ss_gradient_checkpointing": _flag(recipe.gradient_checkpointing),
        "ss_gradient_accumulation_steps": gradient_accumulation_steps or recipe.gradient_accumulation_steps,
        "ss_lr_warmup_steps": recipe.lr_warmup_steps,
        "ss_lr_scheduler": recipe.kohya_lr_scheduler,
        "ss_network_module": "lycoris.kohya" if recipe.use_dora or recipe.network_algo != "lora" else "networks.lora",
        "ss_network_dim": recipe.network_dim,
        "ss_network_alpha": float(recipe.network_alpha),
        "ss_network_train_unet_only": _flag(recipe.network_train_unet_only),
        "ss_mixed_precision": recipe.mixed_precision,
        "ss_fp8_base": _flag(recipe.fp8_base),
        "ss_max_grad_norm": MAX_GRAD_NORM,
        "ss_sd_scripts_commit_hash": provenance.code_commit,  # this pipeline's commit (there is no sd-scripts)
        "ss_full_fp16": _flag(False),
        "ss_v2": _flag(False),
        "ss_base_model_version": family.kohya_base_model_version,
        "ss_sd_model_name": _model_name(recipe.base_model),
        "ss_cache_latents": _flag(recipe.cache_latents),
        "ss_seed": recipe.seed,
        "ss_network_dropout": recipe.network_dropout,  # kohya writes its --network_dropout ("None" when unset)
        "ss_noise_offset": recipe.noise_offset,
        "ss_multires_noise_iterations": recipe.multires_noise_iterations,
        "ss_multires_noise_discount": recipe.multires_noise_discount,
        "ss_ip_noise_gamma": recipe.ip_noise_gamma,
        "ss_zero_terminal_snr": _flag(recipe.zero_terminal_snr),
        "ss_debiased_estimation": _flag(recipe.debiased_estimation_loss),
        "ss_min_snr_gamma": recipe.min_snr_gamma,
        "ss_loss_type": recipe.loss_type,
        "ss_huber_schedule": recipe.huber_schedule,
        "ss_huber_scale": recipe.huber_scale,
        "ss_huber_c": recipe.huber_c,
        "ss_optimizer": _optimizer(recipe.optimizer_settings),
        "ss_batch_size_per_device": recipe.train_batch_size,
        "ss_total_batch_size": recipe.effective_batch_size,
        "ss_resolution": (reso, reso),
        "ss_enable_bucket": _flag(recipe.enable_bucket),
        "ss_min_bucket_reso": recipe.min_bucket_reso,
        "ss_max_bucket_reso": recipe.max_bucket_reso,
        "ss_shuffle_caption": _flag(recipe.shuffle_caption),
        "ss_keep_tokens": recipe.keep_tokens,
        "ss_caption_dropout_rate": recipe.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": recipe.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": recipe.caption_tag_dropout_rate,
        "ss_flip_aug": _flag(recipe.flip_aug if flip_aug is None else flip_aug),
        "ss_random_crop": _flag(recipe.random_crop),
        "ss_masked_loss": _flag(recipe.masked_loss),
        "ss_prior_loss_weight": recipe.prior_loss_weight,
        "ss_dataset_dirs": json.dumps(dataset_dirs, sort_keys=True),
        "ss_reg_dataset_dirs": json.dumps(reg_dataset_dirs or {}, sort_keys=True),
        "ss_tag_frequency": json.dumps(tag_frequency, sort_keys=True, ensure_ascii=False),
        "ss_bucket_info": json.dumps(bucket_info),
    }
    if family.objective == RECTIFIED_FLOW:
        flow = recipe.flow
        ss.update(ss_guidance_scale=flow.guidance_scale, ss_timestep_sampling=flow.timestep_sampling,
                  ss_sigmoid_scale=flow.sigmoid_scale, ss_model_prediction_type=flow.model_prediction_type,
                  ss_discrete_flow_shift=flow.discrete_flow_shift, ss_weighting_scheme=flow.weighting_scheme)
    elif recipe.timestep_sampling != "sigma":  # the U-Nets' modes (step/noise.py), only when set
        ss.update(ss_timestep_sampling=recipe.timestep_sampling, **_sampling_keys(recipe))
    if network_args(recipe.network):
        ss["ss_network_args"] = json.dumps(network_args(recipe.network))
    modelspec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.implementation_version": f"lora-pipeline/{provenance.code_commit}",  # kohya: sd-scripts/<commit>
        "modelspec.architecture": architecture or family.modelspec_architecture,
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": f"{output_name}-e{epoch:03d}",
        "modelspec.resolution": f"{reso}x{reso}",
        "modelspec.date": started.isoformat(),
        "modelspec.prediction_type": MODELSPEC_PREDICTION.get(prediction_type, "epsilon"),
    }
    if recipe.min_timestep is not None or recipe.max_timestep is not None:  # kohya's get_sai_model_spec
        modelspec["modelspec.timestep_range"] = f"{recipe.min_timestep or 0},{recipe.max_timestep or 1000}"
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
