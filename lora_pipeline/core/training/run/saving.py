"""What a run writes as it goes: LoRA files in kohya's format (epoch and step files, from the first process only)
and, with each epoch file, the resume state that a later call continues from (checkpoint.py).

The training thread only takes the snapshot (`to_host`); the files are written by the run's `BackgroundWriter`
(writer.py), the epoch file and its resume state in one job: written at once, the state put in place after the
epoch file."""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path

from lora_pipeline.core.fileio import commit_staged
from lora_pipeline.core.training.inputs.data import steps_per_epoch
from lora_pipeline.core.training.kohya.lora_file import (
    LoraProvenance,
    PreparedLora,
    build_metadata,
    prepare_lora,
    save_lora,
    write_lora,
)
from lora_pipeline.core.training.kohya.network import kohya_state_dict, trainable
from lora_pipeline.core.training.run.background import in_background
from lora_pipeline.core.training.run.checkpoint import ResumeState, epoch_file_name, stage_state, state_path
from lora_pipeline.core.training.run.setup import TrainingRun
from lora_pipeline.core.training.run.writer import BackgroundWriter, to_host
from lora_pipeline.core.training.step.ema import ema_applied
from lora_pipeline.core.training.step.loop import StepContext
from lora_pipeline.core.training.step.optim import averaged_weights


def lora_snapshot(run: TrainingRun, ctx: StepContext, provenance: LoraProvenance, epoch: int,
                  global_step: int) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of the LoRA as it stands (for a schedule-free optimizer: its averaged weights; with use_ema:
    the EMA shadow), the tensors on the host (`to_host`: on CUDA pinned copies still in flight, which the writer
    waits for); `provenance` already holds the base model's hash (`TrainingRun.settled`)."""
    recipe = run.recipe
    unet = ctx.parts.accelerator.unwrap_model(ctx.parts.unet)
    metadata = build_metadata(
        recipe=recipe, provenance=provenance, epoch=epoch, steps=global_step, max_train_steps=run.total,
        num_train_images=run.data.num_train_images,
        num_batches_per_epoch=steps_per_epoch(run.data.images, run.data.image_repeats, recipe.train_batch_size),
        num_reg_images=run.data.num_reg_images, reg_dataset_dirs=run.data.reg_dataset_dirs(),
        tag_frequency=run.data.tag_frequency(recipe.caption_separator), dataset_dirs=run.data.dataset_dirs(),
        training_started_at=run.started_at,
        prediction_type=run.base.noise_scheduler.config.get("prediction_type", run.base.architecture.objective),
        flip_aug=run.flip_aug, architecture=run.base.architecture.lora_architecture(unet),
        gradient_accumulation_steps=run.accumulation, training_finished_at=run.clock(),
        num_validation_images=len(run.data.validation) * run.data.repeats,
        bucket_info=run.data.bucket_info(recipe.enable_bucket,
                                          [b for side in recipe.buckets.sides for b in recipe.buckets.buckets(side)]),
    ) | run.rights_keys | recipe.ema.metadata() | (run.start.metadata() if run.start else {})
    encoders = None if recipe.network_train_unet_only else run.base.text_encoders
    with averaged_weights(ctx.parts.optimizer), ema_applied(ctx.ema):  # device-side clones first: the layout may join
        alpha = recipe.network_alpha if recipe.block_alphas is None else None  # block_alphas: each block's own
        tensors = kohya_state_dict(unet, recipe.model_family, alpha, text_encoders=encoders,
                                   copy=lambda t: t.detach().clone())
    return to_host(tensors, pinned=run.device.type == "cuda"), metadata


def save_lora_file(run: TrainingRun, ctx: StepContext, provenance: LoraProvenance, epoch: int,
                   global_step: int, path: Path, writer: BackgroundWriter) -> None:
    """Write the LoRA as it stands to `path`, on the writer's thread."""
    tensors, metadata = lora_snapshot(run, ctx, run.settled(provenance), epoch, global_step)
    writer.submit(lambda: save_lora(path, tensors, metadata))


def writes(ctx: StepContext) -> bool:
    """Whether this process writes the run's files: the only one, or the first of several (DDP)."""
    return ctx.parts.accelerator.is_main_process


def save_epoch(run: TrainingRun, ctx: StepContext, provenance: LoraProvenance, epoch: int, global_step: int,
               mean_loss: float, history: tuple[list[dict], list[float], list[float]],
               writer: BackgroundWriter) -> None:
    """Write the epoch file and the resume state after it, on the writer's thread; `history` is (saved, losses,
    lrs) of the run so far, and `saved` gains the epoch file's record once the file is written (read it after
    the writer's `wait`)."""
    saved, losses, lrs = history
    provenance = run.settled(provenance)  # the resume state's key and provenance hold the base model's hash
    path = run.out_dir / epoch_file_name(run.version, run.recipe.name, epoch)
    tensors, metadata = lora_snapshot(run, ctx, provenance, epoch, global_step)
    pinned = run.device.type == "cuda"
    lora = to_host(dict(trainable(run.base)), pinned)
    optimizer = to_host(ctx.parts.optimizer.state_dict(), pinned)
    lr_scheduler = to_host(ctx.lr_scheduler.state_dict(), pinned)
    ema = to_host(ctx.ema.shadow, pinned) if ctx.ema is not None else None
    losses, lrs = list(losses), list(lrs)  # training goes on appending to the run's lists

    def write() -> None:
        with run.times.host("writer_epoch_file"):
            prepared = prepare_lora(tensors, metadata)
        saved.append({"epoch": epoch, "file": path.name, "steps": global_step, "mean_loss": mean_loss,
                      "sha256": prepared.sha256})
        state = ResumeState(
            key=run.key, epoch=epoch, global_step=global_step, started_at=run.started_at,
            provenance=asdict(provenance), saved=list(saved), losses=losses, lrs=lrs, lora=lora,
            optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema,
        )
        write_both(run, path, prepared, state)

    writer.submit(write)


def write_both(run: TrainingRun, path: Path, prepared: PreparedLora, state: ResumeState) -> None:
    """The epoch file and the resume state written at once (the state by a second thread: both are hundreds of MB
    for SDXL), the state put in place only after the epoch file it vouches for; a failed epoch file leaves no
    state behind."""
    staging = in_background("resume-state", stage_state, run.out_dir, state)
    try:
        with run.times.host("writer_epoch_file"):
            write_lora(path, prepared)
    except BaseException:
        with contextlib.suppress(BaseException):
            staging.result().unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the state's folder, where this job made it
            state_path(run.out_dir).parent.rmdir()
        raise
    with run.times.host("writer_resume_state"):  # what is left of it once the epoch file is in place
        staged = staging.result()
    commit_staged(staged, state_path(run.out_dir))
