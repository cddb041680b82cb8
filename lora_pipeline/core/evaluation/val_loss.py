"""Validation and training loss per epoch, and the loss-curve PNG.

Validation loss is the training objective (training.step.denoising.compute_loss: for DDPM the recipe's noise options
and loss weighting, its prediction type; for the rectified flow of FLUX.1 the recipe's timestep sampling, prediction
type and weighting, training.step.flux_step) on the images the training split held out (training.data: same split,
same images every time).
Every epoch sees identical inputs: each image's latents are cached once, and its noise and timesteps (sigmas)
come from a generator seeded by (sample_seed, image index), so differences between epochs are the LoRA's alone.
When the split holds nothing out (validation_split 0, or a single image), the training images stand in and
the output says so: such a "validation" loss measures fit, not generalisation.

Training loss per epoch is the mean of the run's per-step `loss` metric in MLflow over that epoch's steps
(the header's ss_steps and ss_num_batches_per_epoch say which steps those are).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lora_pipeline.core.errors import one_line
from lora_pipeline.core.models.loading import BaseModel
from lora_pipeline.core.models.sampling import deterministic
from lora_pipeline.core.plots import line_chart
from lora_pipeline.core.training.inputs.data import TrainingData
from lora_pipeline.core.training.inputs.encode import LatentSource, TextSource, time_ids
from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline.core.training.recipe_groups import NoiseSettings
from lora_pipeline.core.training.seeds import Stream, torch_generator
from lora_pipeline.core.training.step.denoising import StepBatch, compute_loss
from lora_pipeline.core.training.step.flux_step import RectifiedFlow
from lora_pipeline.core.training.step.objective import training_objective

NOISE_DRAWS = 8  # noised copies (noise + timestep) of each validation image, one batch per image
VALIDATION_STREAM = 1 << 40  # keeps validation draws apart from any training step's
TRAIN_LOSS_METRIC = "loss"  # tracking.TrainingTracker.log_steps: per global step


@dataclass
class ValidationSet:
    """Fixed inputs of the validation loss: one batch of NOISE_DRAWS copies per image."""

    held_out: bool  # False: no image was held out and the training images stand in
    images: list[str]  # snapshot paths
    batches: list[StepBatch]
    settings: NoiseSettings
    seed: int
    flow: RectifiedFlow | None = None  # the rectified-flow objective of a flow family; None: DDPM (`settings`)

    def describe(self) -> dict[str, object]:
        note = ("held-out images (recipe.validation_split)" if self.held_out else
                "NO held-out image (validation_split leaves none): the training images stand in, so this "
                "measures fit to the training set, not generalisation")
        return {"held_out": self.held_out, "images": list(self.images), "noise_draws_per_image": NOISE_DRAWS,
                "seed": self.seed, "note": note}


def prepare_validation(
    base: BaseModel, data: TrainingData, recipe: Recipe, device: torch.device, dtype: torch.dtype
) -> ValidationSet:
    """Encode the validation images and their (unshuffled) captions once, with the frozen VAE and text encoders;
    set up the training objective as the trainer does (training_objective: the DDPM scheduler replaced in place)."""
    images = list(data.validation) or list(data.train)
    latents = LatentSource(base, images, recipe.seed, cache=True, device=device)
    text = TextSource(base, dtype, device, [image.caption for image in images])
    batches = []
    for index, image in enumerate(images):
        cond = text.batch([image.caption] * NOISE_DRAWS)
        batches.append(StepBatch(
            latents=latents.batch([index] * NOISE_DRAWS, 0),
            encoder_hidden_states=cond.hidden,
            text_embeds=cond.pooled,
            time_ids=time_ids([image] * NOISE_DRAWS, dtype, device) if base.architecture.micro_conditioning else None,
        ))
    return ValidationSet(
        held_out=bool(data.validation), images=[image.rel for image in images], batches=batches,
        settings=recipe.noise, seed=recipe.sample_seed, flow=training_objective(base, recipe.noise, recipe.flow),
    )


@contextmanager
def _autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Mixed precision on an accelerator, as training ran; plain float32 on CPU."""
    with torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext():
        yield


@torch.no_grad()
def validation_loss(unet: torch.nn.Module, base: BaseModel, validation: ValidationSet, dtype: torch.dtype) -> float:
    """Mean loss of the training objective over the validation set with the denoiser `unet` as it is now (LoRA
    loaded at weight 1)."""
    losses = []
    device = next(unet.parameters()).device
    with deterministic(device), _autocast(device, dtype):
        for index, batch in enumerate(validation.batches):
            generator = torch_generator(validation.seed, Stream.NOISE, VALIDATION_STREAM, index)
            losses.append(float(compute_loss(unet, base.noise_scheduler, batch, generator, validation.settings,
                                             validation.flow)))
    return statistics.fmean(losses)


def training_losses(
    client: MlflowClient, run_id: str, headers: Mapping[int, Mapping[str, str]]
) -> tuple[dict[int, float | None], str]:
    """Mean training loss per epoch from the run's per-step `loss` history; and a note on where it came from.

    Epochs whose steps the run does not hold get None, and the note says why (it never invents a number).
    """
    missing: dict[int, float | None] = dict.fromkeys(headers)
    if not run_id:
        return missing, "training loss unavailable: the LoRA header names no MLflow run"
    try:
        history = client.get_metric_history(run_id, TRAIN_LOSS_METRIC)
    except MlflowException as exc:
        return missing, f"training loss unavailable: MLflow run {run_id}: {one_line(exc)}"
    by_step = {m.step: m.value for m in history}
    out: dict[int, float | None] = {}
    for epoch, header in headers.items():
        last, count = int(header.get("ss_steps", 0)), int(header.get("ss_num_batches_per_epoch", 0))
        steps = range(last - count + 1, last + 1)
        values = [by_step[s] for s in steps if s in by_step]
        out[epoch] = statistics.fmean(values) if count and len(values) == count else None
    if any(v is None for v in out.values()):
        return out, f"training loss partly unavailable: MLflow run {run_id} lacks some epochs' steps"
    return out, f"mean of the per-step '{TRAIN_LOSS_METRIC}' metric of MLflow run {run_id} over each epoch's steps"


def loss_plot(epochs: Sequence[int], train: Sequence[float | None], val: Sequence[float | None], recommended: int,
              path: Path, title: str, held_out: bool) -> Path:
    """Training and validation loss per epoch (missing points left out), the recommended epoch marked; atomic PNG."""
    val_label = "validation loss" if held_out else "validation loss (NO held-out images: training images)"
    with line_chart(path, title, "epoch", size=(7, 4)) as axes:
        curves = ((train, "tab:blue", "training loss (epoch mean)"), (val, "tab:orange", val_label))
        for values, colour, label in curves:
            points = [(e, v) for e, v in zip(epochs, values, strict=True) if v is not None]
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", color=colour, label=label)
        axes.axvline(recommended, color="tab:red", linestyle="--", linewidth=1.2,
                     label=f"recommended: epoch {recommended}")
        axes.set_xticks(list(epochs))
    return path
