"""Which objective a model trains on, set up once per run: what training and the validation loss both use."""

from __future__ import annotations

from lora_pipeline.core.models.families.base import RECTIFIED_FLOW
from lora_pipeline.core.models.loading import BaseModel
from lora_pipeline.core.training.recipe_groups import FlowSettings, NoiseSettings
from lora_pipeline.core.training.step.flux_step import RectifiedFlow
from lora_pipeline.core.training.step.noise import training_scheduler


def training_objective(base: BaseModel, noise: NoiseSettings, flow: FlowSettings) -> RectifiedFlow | None:
    """The rectified-flow objective (`flow`'s settings, `noise`'s loss function) when the family trains on it;
    otherwise None, the DDPM objective, after replacing the model's scheduler by the training one of `noise`
    (v-prediction, zero terminal SNR)."""
    if base.architecture.objective == RECTIFIED_FLOW:
        return RectifiedFlow.of(flow, base.denoiser, noise)
    base.noise_scheduler = training_scheduler(base.noise_scheduler, noise)
    return None
