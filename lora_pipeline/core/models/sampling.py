"""Rendering images with a base model (and a LoRA) through the stock diffusers pipeline, for the evaluation grid
and the samples while training.

Each epoch's kohya file is loaded through `load_lora_weights` and weighted with `set_adapters` — exactly how a
user loads the LoRA — so the images show what users will get. A LoHa / LoKr file, which diffusers' loader does not
read for the U-Nets, goes on as a peft adapter of the same weight delta (lycoris.py) and is weighted alike.
Every image of one prompt starts from the same noise (a generator seeded from `seed + prompt index`), so only the
epoch and the weight differ between them.
The family names the pipeline (FluxPipeline for FLUX.1, whose `guidance_scale` is [dev]'s embedded guidance)
and its further call arguments (FLUX's T5 length).
The settings are plain values (`SamplingSettings`; a recipe gives its own as `Recipe.sampling`), so neither
training nor evaluation needs the other to render.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import safetensors.torch
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_bytes
from lora_pipeline.core.models.dora import attach_file_dora, split_dora
from lora_pipeline.core.models.families import ModelFamily
from lora_pipeline.core.models.kohya_names import for_diffusers
from lora_pipeline.core.models.loading import BaseModel
from lora_pipeline.core.models.lycoris import file_algo, load_lycoris
from lora_pipeline.core.models.t5_lora import delete_t5_lora, load_t5_lora, weigh_t5_lora


@dataclass(frozen=True)
class SamplingSettings:
    """What an image is rendered from besides the model: prompts, their seed, size, steps and guidance."""

    prompts: tuple[str, ...]
    seed: int  # prompt i is rendered from seed + i
    resolution: int  # the square side in px
    steps: int
    guidance_scale: float


def sampling_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """float32 on CPU; on an accelerator the training's mixed precision (fp16 / bf16), as training used."""
    if device.type == "cpu":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def load_pipeline(base: BaseModel, dtype: torch.dtype, v_prediction: bool = False) -> DiffusionPipeline:
    """The stock text-to-image pipeline around the already loaded base model (its modules are shared, not copied).

    Only the sampling scheduler is read from the model folder (set to v-prediction for a recipe with
    `v_parameterization`); the safety checker is off, progress bars too. The VAE decodes in the sampling dtype
    (SDXL's pipeline upcasts an fp16 VAE itself where needed).
    """
    if base.vae.dtype != dtype:
        with quiet_diffusers():
            base.vae.to(dtype=dtype)
    parts: dict[str, object] = {base.architecture.denoiser_subfolder: base.denoiser, "vae": base.vae}
    for suffix, tokenizer, encoder in zip(("", "_2"), base.tokenizers, base.text_encoders, strict=False):
        parts[f"tokenizer{suffix}"], parts[f"text_encoder{suffix}"] = tokenizer, encoder
    parts.update(base.architecture.pipeline_options)
    pipe = getattr(diffusers, base.architecture.pipeline).from_pretrained(base.source, local_files_only=True, **parts)
    if v_prediction:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="v_prediction")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels on CPU, where that makes outputs byte-identical run to run; restored afterwards.

    On an accelerator the seeds are fixed all the same, but kernels keep their fast (not bitwise
    reproducible) choices: deterministic CUDA needs settings beyond this process's say (CUBLAS_WORKSPACE_CONFIG).
    """
    if device.type != "cpu":
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Hide diffusers' warnings that are expected here and would bury the run's own log lines.

    "No LoRA keys for the text encoder" (our LoRAs are U-Net only) and "cast with to()" (the SDXL pipeline
    itself moves an fp16 VAE to float32 and back on every call).
    """
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


@contextmanager
def loaded_lora(pipe: DiffusionPipeline, path: Path, epoch: int, family: ModelFamily | None = None) -> Iterator[str]:
    """Load one epoch's kohya file as adapter `e<epoch>`; delete it again afterwards.

    Text-encoder keys go through kohya_names.for_diffusers (diffusers 0.42 misses kohya's `text_model` level in
    transformers 5's CLIP models); FLUX.1's T5 modules, which diffusers drops, go on through t5_lora.py. A DoRA
    file's `dora_scale` tensors, which diffusers drops too, go back on the placed modules through dora.py (which
    names modules by the `family`, needed then)."""
    name = f"e{epoch}"
    encoders = [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e]
    tensors, scales = split_dora(safetensors.torch.load_file(str(path)))  # scales keep the file's keys
    tensors = for_diffusers(tensors, encoders)
    if file_algo(tensors) != "lora":  # LoHa / LoKr, which diffusers' loader does not read for the U-Nets
        with _lycoris_loaded(pipe, path, tensors, name):
            yield name
        return
    if scales and family is None:
        raise ValueError(f"{path.name} is a DoRA file: loading it needs its model family")
    try:
        with quiet_diffusers():
            pipe.load_lora_weights(tensors, adapter_name=name)
    except AssertionError:  # diffusers' kohya FLUX converter: widths that are not FLUX.1's full ones
        raise UserError("diffusers' load_lora_weights cannot convert this LoRA: its kohya FLUX converter splits "
                        "single blocks' linear1 at FLUX.1's full widths; a tiny model's LoRA loads when trained "
                        "with train_blocks: double", path) from None
    try:
        if scales and family is not None:
            attach_file_dora(family, getattr(pipe, family.denoiser_subfolder), encoders, name, scales)
        load_t5_lora(pipe, tensors, name)  # the T5 modules diffusers' loader drops
        yield name
    finally:
        pipe.delete_adapters([name])
        delete_t5_lora(pipe, name)


@contextmanager
def _lycoris_loaded(pipe: DiffusionPipeline, path: Path, tensors: dict[str, torch.Tensor], name: str) -> Iterator[None]:
    from safetensors import safe_open

    from lora_pipeline.core.models.families import FAMILIES

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    family = next(f for f in FAMILIES.values() if f.pipeline == type(pipe).__name__)
    try:
        load_lycoris(getattr(pipe, family.denoiser_subfolder), family, tensors, name, metadata)
    except ValueError as exc:
        raise UserError(f"this LoHa/LoKr file cannot be evaluated: {exc}", path) from None
    try:
        yield
    finally:
        pipe.delete_adapters([name])


def set_lora_weight(pipe: DiffusionPipeline, adapter: str, weight: float) -> None:
    """Make a loaded LoRA the active one at `weight`: set_adapters for what diffusers loaded, and T5's part."""
    pipe.set_adapters([adapter], adapter_weights=[weight])
    weigh_t5_lora(pipe, adapter, weight)


@torch.no_grad()
def sample(pipe: DiffusionPipeline, settings: SamplingSettings, adapter: str | None = None, weight: float = 0.0,
           options: Mapping[str, Any] | None = None, copies: int = 1) -> np.ndarray:
    """One image per sample prompt (one batched call) as uint8 [prompt, H, W, 3].

    `adapter` None samples the base model alone (the weight-0 column); otherwise the adapter is set to `weight`.
    `options`: the family's further arguments of the pipeline's call (`BaseModel.pipeline_call_options`).
    `copies`: the prompts that many times over in the one call, [copy x prompt, H, W, 3], image (c, i) from the
    noise of seed + i (evaluation/lora_batch.py weighs the copies differently).
    """
    if adapter is not None:
        set_lora_weight(pipe, adapter, weight)
    prompts = list(settings.prompts) * copies
    generators = [torch.Generator("cpu").manual_seed(settings.seed + i % len(settings.prompts))
                  for i in range(len(prompts))]
    with deterministic(pipe.device), quiet_diffusers():
        images = pipe(
            prompts, height=settings.resolution, width=settings.resolution, num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale, generator=generators, output_type="np", **(options or {}),
        ).images
    return np.clip(np.rint(np.asarray(images, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def save_png(image: Image.Image, path: Path) -> None:
    """PNG bytes depend on the pixels only (no timestamps or text chunks); written atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    atomic_write_bytes(path, buffer.getvalue())
