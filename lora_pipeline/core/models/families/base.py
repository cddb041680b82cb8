"""What a model family says about itself: the interface every family module fills in (no torch import here:
recipes and provenance read families without it)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a family is read by the recipe loader and provenance, which do not import torch
    import torch


@dataclass(frozen=True)
class ModelFamily(ABC):
    """One architecture the trainer supports; a module per family (sd15.py, sdxl.py) makes its instance.

    The U-Net families load a `unet/` denoiser, one `text_encoder*/` per entry of `text_encoders` (class names in
    transformers) and a DDPM training scheduler from the model folder.
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

    @abstractmethod
    def is_own_denoiser(self, config: Any) -> bool:
        """Whether a loaded denoiser's config is this family's (an SDXL U-Net is not an SD 1.x one)."""

    @abstractmethod
    def conditioning(self, outputs: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(encoder hidden states, pooled embeddings or None) from each text encoder's output, called with
        `output_hidden_states=True`: exactly what the family's inference pipeline feeds the denoiser."""

    @abstractmethod
    def kohya_module_namer(self, denoiser: Any) -> Callable[[str], str]:
        """The function from a diffusers module path of this denoiser to the path kohya's key names use."""
