"""Base models for training and sampling: resolve, load (offline), encode prompts the way the pipelines do.

A recipe's `base_model` is a tiny model name (`tiny-sd`, `tiny-sdxl`: generated under `models/`), a diffusers
folder (an absolute path, or a folder name under `models/`), or a Hugging Face hub id. Hub ids load from the
local cache only when HF_HUB_OFFLINE=1, which the Makefile and tests set: nothing downloads at run time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextModel, CLIPTokenizer

from lora_pipeline.core.errors import UserError, one_line
from lora_pipeline.core.models.families import FAMILIES, ModelFamily, model_family
from lora_pipeline.core.models.model_hash import base_model_hash
from lora_pipeline.core.models.tiny import TINY_MODELS, ensure_tiny_model

diffusers_logging.disable_progress_bar()  # "Loading pipeline components..." of a tiny model: our own lines say more

__all__ = [
    "TINY_MODELS", "BaseModel", "base_model_hash", "encode_prompts", "ensure_tiny_model", "host_to_device",
    "load_base_model", "resolve_base_model", "sdxl_add_time_ids",
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

    `tokenizers`/`text_encoders` hold one entry for SD 1.5 and two for SDXL. The VAE stays float32 whatever
    `dtype` the rest uses (SDXL's VAE overflows in fp16; it only encodes latents once per image).
    """

    family: str
    source: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    tokenizers: list[CLIPTokenizer]
    text_encoders: list[CLIPTextModel]
    noise_scheduler: DDPMScheduler
    vae_scale_factor: int
    latents_scaling_factor: float
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def architecture(self) -> ModelFamily:
        """What the family of this model says (families/): conditioning, key names, pipeline, metadata."""
        return model_family(self.family)


def _check_family(unet: UNet2DConditionModel, family: ModelFamily, source: str) -> None:
    if not family.is_own_denoiser(unet.config):
        actual = next(f.label for f in FAMILIES.values() if f.is_own_denoiser(unet.config))
        raise UserError(f"base model is {actual} model but the recipe says model_family: {family.name}", source)


def load_base_model(
    models_dir: Path,
    base_model: str,
    family: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> BaseModel:
    """Load U-Net, VAE, tokenizer(s), text encoder(s) and a DDPM training scheduler from the model's config."""
    architecture = model_family(family)
    source = resolve_base_model(models_dir, base_model)
    opts: dict[str, Any] = {"local_files_only": _offline() or Path(source).is_dir()}
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **opts)
        _check_family(unet, architecture, source)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32, **opts)
        suffixes = ["", *(f"_{n}" for n in range(2, len(architecture.text_encoders) + 1))]
        tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder=f"tokenizer{s}", **opts) for s in suffixes]
        encoders = [
            getattr(transformers, cls).from_pretrained(source, subfolder=f"text_encoder{s}", dtype=dtype, **opts)
            for s, cls in zip(suffixes, architecture.text_encoders, strict=True)
        ]
        config = DDPMScheduler.load_config(source, subfolder="scheduler", **opts)
    except OSError as exc:  # missing folder/file, or a hub id that is not cached while offline
        raise UserError(f"cannot load base model: {one_line(exc)}", source) from None
    # kohya trains with DDPM and clip_sample off; betas and prediction type come from the model's own config.
    noise_scheduler = DDPMScheduler.from_config(config, clip_sample=False)
    target = torch.device(device)
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)
        module.eval()
        module.to(target)
    return BaseModel(
        family=family, source=source, unet=unet, vae=vae, tokenizers=tokenizers, text_encoders=encoders,
        noise_scheduler=noise_scheduler, vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        latents_scaling_factor=float(vae.config.scaling_factor), device=target,
    )


def default_device(device: str | None) -> torch.device:
    """`device`, or when it is None CUDA if there is a GPU, else the CPU (training and evaluation alike)."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to `device` without making the host wait for the GPU.

    A plain `.to("cuda")` from pageable memory blocks until the copy (so every kernel queued before it) is
    done, which keeps the host from running ahead of a launch-bound training step; from pinned memory the
    copy is queued like a kernel. Elsewhere it is an ordinary `.to(device)`.
    """
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _token_ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


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
    outputs = [encoder(host_to_device(_token_ids(tokenizer, prompts), encoder.device), output_hidden_states=True)
               for tokenizer, encoder in zip(base.tokenizers, base.text_encoders, strict=True)]
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
