"""What a model family says about itself: the interface every family module fills in (no torch import here:
recipes and provenance read families without it)."""

from __future__ import annotations

from abc import ABC
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a family is read by the recipe loader and provenance, which do not import torch
    pass

DDPM, RECTIFIED_FLOW = "ddpm", "rectified_flow"  # the training objectives (core/training/step/)


@dataclass(frozen=True)
class ModelFamily(ABC):
    """One architecture the trainer supports; a module per family (sd15.py, sdxl.py) makes its instance.

    A family loads its denoiser (`denoiser_class` from diffusers, in `denoiser_subfolder/`, which is also its
    pipeline component name), one `text_encoder*/` per entry of `text_encoders` and `tokenizer*/` per entry of
    `tokenizers` (class names in transformers), and the training scheduler `scheduler_class` from the model
    folder; `objective` names the loss a training step computes ("ddpm" or "rectified_flow"). The defaults are
    the U-Net families'.
    """

    name: str  # a recipe's `model_family`
    label: str  # how messages name it ("an SDXL model")
    text_encoders: tuple[str, ...]  # transformers class of text_encoder/, text_encoder_2/, ...
    text_prefixes: tuple[str, ...]  # kohya's key prefix of each text encoder's LoRA modules
    micro_conditioning: bool  # SDXL's pooled text embeddings and added time ids (original size, crop, target)
    pipeline: str  # the diffusers pipeline class that samples from it
    pipeline_options: tuple[tuple[str, Any], ...]  # extra keyword arguments of that pipeline's from_pretrained
    kohya_base_model_version: str  # kohya's ss_base_model_version
    modelspec_architecture: str  # modelspec.architecture (the SAI model spec) of its LoRAs
    modelspec_implementation: str  # modelspec.implementation
    tokenizers: tuple[str, ...] = ("CLIPTokenizer",)  # transformers class of tokenizer/, tokenizer_2/, ...
    denoiser_subfolder: str = "unet"
    denoiser_class: str = "UNet2DConditionModel"
    scheduler_class: str = "DDPMScheduler"
    objective: str = DDPM
    pixel_multiple: int = 8  # image sides must be multiples of this (the VAE factor, x2 where latents are packed)
    kohya_layout: str = "per_module"  # how its LoRA modules are chosen and named (models/lora_layout.py)
    max_blocks_to_swap: int = 0  # the most blocks `blocks_to_swap` may keep on the CPU (0: no block swapping)
    # kohya's key prefix of the T5 encoder's LoRA (`train_t5xxl`), the text encoder after those of text_prefixes;
    # "": the family has no T5 encoder
    t5_prefix: str = ""
    # the recipe's timestep_sampling modes its step draws (U-Nets: step/noise.py; FLUX.1: step/flow.py)
    timestep_samplings: tuple[str, ...] = ("sigma", "uniform", "sigmoid", "logit_normal")

    def lora_text_prefixes(self, train_t5xxl: bool) -> tuple[str, ...]:
        """kohya's prefix of each text encoder, in order, that carries a LoRA when the text encoders train:
        those of `text_prefixes`, then T5's with `train_t5xxl`."""
        return self.text_prefixes + ((self.t5_prefix,) if train_t5xxl and self.t5_prefix else ())

    def token_lengths(self, tokenizers: Sequence[Any], denoiser: Any, t5_max_length: int | None) -> list[int]:
        """The token length of each text encoder's input: the tokenizers' own (CLIP: 77)."""
        return [tokenizer.model_max_length for tokenizer in tokenizers]

    def lora_architecture(self, denoiser: Any) -> str:
        """modelspec.architecture of a LoRA of this denoiser."""
        return self.modelspec_architecture

    def swapped_blocks(self, denoiser: Any, count: int) -> list[Any]:
        """The `count` blocks of the denoiser whose weights live on the CPU (models/offload.py BlockSwap)."""
        raise ValueError(f"{self.label} model has no blocks to swap")

    def pipeline_call_options(self, denoiser: Any, token_lengths: Sequence[int]) -> dict[str, Any]:
        """Keyword arguments of the pipeline's call beyond prompts, size, steps, guidance and generators: none
        (the U-Net pipelines pad their prompts to the tokenizers' own length)."""
        return {}

    def guidance_note(self, denoiser: Any, guidance_scale: float) -> str:
        """How a sampled image is guided, as a grid's subtitle says it: classifier-free guidance."""
        return f"cfg {guidance_scale:g}"
