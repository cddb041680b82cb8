"""Base models for training and sampling: resolve, load (offline), encode prompts the way the pipelines do.

A recipe's `base_model` is a tiny model name (`tiny-sd`, `tiny-sdxl`, `tiny-flux`, `tiny-flux-schnell`: generated
under `models/`), a diffusers
folder (an absolute path, or a folder name under `models/`), or a Hugging Face hub id. Hub ids load from the
local cache only when HF_HUB_OFFLINE=1, which the Makefile and tests set: nothing downloads at run time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler
from diffusers.utils import logging as diffusers_logging
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lora_pipeline.core.errors import UserError, one_line
from lora_pipeline.core.models.families import FAMILIES, ModelFamily, model_family
from lora_pipeline.core.models.model_hash import base_model_hash
from lora_pipeline.core.models.tiny import TINY_MODELS, ensure_tiny_model

diffusers_logging.disable_progress_bar()  # "Loading pipeline components..." of a tiny model: our own lines say more

__all__ = [
    "TINY_MODELS", "BaseModel", "base_model_hash", "encode_prompts", "encode_token_ids", "ensure_tiny_model",
    "host_to_device", "prompt_token_ids",
    "load_base_model", "resolve_base_model", "sdxl_add_time_ids", "text_folders", "vae_encoding_dtype",
]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_base_model(models_dir: Path, base_model: str) -> str:
    """The folder or hub id to load: tiny names are generated first; paths must be diffusers folders."""
    if base_model in TINY_MODELS:
        return str(ensure_tiny_model(models_dir, base_model))
    candidates = [Path(base_model).expanduser()]
    if not Path(base_model).is_absolute():
        candidates.append(models_dir / base_model)
    for path in candidates:
        if path.exists():
            if not (path / "model_index.json").is_file():
                raise UserError("base model must be a diffusers folder (with model_index.json)", path)
            return str(path.resolve())
    if base_model.startswith((".", "/", "~")) or base_model.count("/") != 1:
        raise UserError(f"base model '{base_model}' is neither a local diffusers folder nor a hub id (org/name)")
    return base_model


@dataclass
class BaseModel:
    """Everything a LoRA trainer needs from a base model, frozen and in eval mode.

    `tokenizers`/`text_encoders` hold one entry for SD 1.5 and two for SDXL and FLUX.1 (CLIP-L and T5), each
    tokenizer padding to its entry of `token_lengths`. The denoiser is the family's (a U-Net, FLUX's
    transformer); `unet` is its older name, kept for the U-Net code that reads it. Latents are `(z - shift) *
    scale` of a VAE sample z (the shift is 0 but for FLUX). The VAE stays float32 whatever `dtype` the rest uses
    (SDXL's VAE overflows in fp16; it only encodes latents once per image).
    """

    family: str
    source: str
    denoiser: torch.nn.Module
    vae: AutoencoderKL
    tokenizers: list[PreTrainedTokenizerBase]
    text_encoders: list[PreTrainedModel]
    noise_scheduler: Any  # the family's training scheduler: DDPMScheduler, FlowMatchEulerDiscreteScheduler
    vae_scale_factor: int
    latents_scaling_factor: float
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    latents_shift_factor: float = 0.0
    token_lengths: list[int] = field(default_factory=list)

    @property
    def unet(self) -> Any:
        """The denoiser under its U-Net name."""
        return self.denoiser

    @property
    def architecture(self) -> ModelFamily:
        """What the family of this model says (families/): conditioning, key names, pipeline, metadata."""
        return model_family(self.family)

    @property
    def pipeline_call_options(self) -> dict[str, Any]:
        """What the family's pipeline is called with besides the sampling settings (FLUX: its T5 length)."""
        return self.architecture.pipeline_call_options(self.denoiser, self.token_lengths)


def _check_family(denoiser: torch.nn.Module, family: ModelFamily, source: str) -> None:
    if not family.is_own_denoiser(denoiser.config):
        actual = next(f.label for f in FAMILIES.values()
                      if f.denoiser_class == family.denoiser_class and f.is_own_denoiser(denoiser.config))
        raise UserError(f"base model is {actual} model but the recipe says model_family: {family.name}", source)


def text_folders(architecture: ModelFamily) -> list[tuple[str, str]]:
    """(tokenizer, text encoder) subfolders of each of the family's text encoders, as diffusers names them:
    `tokenizer` / `text_encoder`, then `tokenizer_2` / `text_encoder_2`."""
    suffixes = ["", *(f"_{n}" for n in range(2, len(architecture.text_encoders) + 1))]
    return [(f"tokenizer{s}", f"text_encoder{s}") for s in suffixes]


def load_base_model(
    models_dir: Path,
    base_model: str,
    family: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    t5_max_length: int | None = None,
) -> BaseModel:
    """Load the family's denoiser, VAE, tokenizer(s), text encoder(s) and training scheduler from the model's
    config; `t5_max_length` is FLUX's T5 token length (None: the variant's default, families/flux1.py)."""
    architecture = model_family(family)
    source = resolve_base_model(models_dir, base_model)
    opts: dict[str, Any] = {"local_files_only": _offline() or Path(source).is_dir()}
    try:
        denoiser = getattr(diffusers, architecture.denoiser_class).from_pretrained(
            source, subfolder=architecture.denoiser_subfolder, torch_dtype=dtype, **opts)
        _check_family(denoiser, architecture, source)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32, **opts)
        folders = text_folders(architecture)
        tokenizers = [getattr(transformers, cls).from_pretrained(source, subfolder=tokenizer, **opts)
                      for (tokenizer, _), cls in zip(folders, architecture.tokenizers, strict=True)]
        encoders = [
            getattr(transformers, cls).from_pretrained(source, subfolder=encoder, dtype=dtype, **opts)
            for (_, encoder), cls in zip(folders, architecture.text_encoders, strict=True)
        ]
        scheduler_class = getattr(diffusers, architecture.scheduler_class)
        config = scheduler_class.load_config(source, subfolder="scheduler", **opts)
    except OSError as exc:  # missing folder/file, or a hub id that is not cached while offline
        raise UserError(f"cannot load base model: {one_line(exc)}", source) from None
    # kohya trains SD with DDPM and clip_sample off; betas and prediction type come from the model's own config.
    # FLUX's flow-matching scheduler is read as it is (the step draws its own sigmas, step/flow.py).
    extra = {"clip_sample": False} if scheduler_class is DDPMScheduler else {}
    noise_scheduler = scheduler_class.from_config(config, **extra)
    target = torch.device(device)
    for module in (denoiser, vae, *encoders):
        module.requires_grad_(False)
        module.eval()
        module.to(target)
    return BaseModel(
        family=family, source=source, denoiser=denoiser, vae=vae, tokenizers=tokenizers, text_encoders=encoders,
        noise_scheduler=noise_scheduler, vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        latents_scaling_factor=float(vae.config.scaling_factor), device=target,
        latents_shift_factor=float(vae.config.shift_factor or 0.0),
        token_lengths=architecture.token_lengths(tokenizers, denoiser, t5_max_length),
    )


def default_device(device: str | None) -> torch.device:
    """`device`, or when it is None CUDA if there is a GPU, else the CPU (training and evaluation alike)."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def vae_encoding_dtype(precision: str, no_half_vae: bool) -> torch.dtype:
    """The dtype the VAE encodes training (and validation) images in, for a run of mixed `precision` ("no" on a
    CPU): bf16 under bf16, as kohya's half VAE (its default; `no_half_vae` keeps float32); float32 otherwise,
    fp16 included, where the SD and SDXL VAEs overflow (kohya's users pass --no_half_vae there)."""
    return torch.bfloat16 if precision == "bf16" and not no_half_vae else torch.float32


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to `device` without making the host wait for the GPU.

    A plain `.to("cuda")` from pageable memory blocks until the copy (so every kernel queued before it) is
    done, which keeps the host from running ahead of a launch-bound training step; from pinned memory the
    copy is queued like a kernel. Elsewhere it is an ordinary `.to(device)`.
    """
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _token_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str], length: int) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def encode_prompts(
    base: BaseModel, prompts: list[str], *, grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text conditioning exactly as the family's inference pipeline computes it (no clip skip), so training
    matches: (encoder hidden states, pooled embeddings or None), as `ModelFamily.conditioning` makes them from
    the text encoders' outputs. Without gradients unless `grad` (text encoders that carry a LoRA being trained).
    """
    with torch.set_grad_enabled(grad):
        return _encode_prompts(base, prompts)


def _encode_prompts(base: BaseModel, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = [host_to_device(t, e.device) for t, e in zip(prompt_token_ids(base, prompts), base.text_encoders,
                                                         strict=True)]
    return encode_token_ids(base, ids)


def prompt_token_ids(base: BaseModel, prompts: list[str]) -> list[torch.Tensor]:
    """Each text encoder's token ids of the prompts (on the CPU): the host half of `encode_prompts`."""
    return [_token_ids(tokenizer, prompts, length) for tokenizer, length in zip(base.tokenizers, base.token_lengths,
                                                                                  strict=True)]


def encode_token_ids(base: BaseModel, ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The device half of `encode_prompts`: the conditioning of each encoder's token ids (on its device), with
    gradients where grad mode is on; no host work, so a captured training step can hold it."""
    outputs = [encoder(t, output_hidden_states=True) for encoder, t in zip(base.text_encoders, ids, strict=True)]
    return base.architecture.conditioning(outputs)


def sdxl_add_time_ids(
    original_size: tuple[int, int],
    crop_top_left: tuple[int, int],
    target_size: tuple[int, int],
    batch: int,
    dtype: torch.dtype,
    device: str | torch.device,
) -> torch.Tensor:
    """SDXL's micro-conditioning row (original h, w, crop top, left, target h, w), repeated `batch` times.

    Sizes are (height, width) in pixels, as StableDiffusionXLPipeline._get_add_time_ids builds them.
    """
    row = [*original_size, *crop_top_left, *target_size]
    return torch.tensor([row] * batch, dtype=dtype, device=device)
