"""The epoch loop of a run: the shapes warmed up ahead (warmup.py), each epoch's steps (cut into chunks where step
files are written), the epoch file and resume state, the sample strips, the MLflow logging, and at the end the loss
curve and the `TrainResult`. Files and MLflow calls of the loop are jobs of a `BackgroundWriter` (writer.py): the
next epoch trains while the last one is written; the run waits for them before it returns."""

from __future__ import annotations

import functools
import statistics
import time

from lora_pipeline.core.training.inputs.augment import flip_warning
from lora_pipeline.core.training.inputs.data import epoch_batches
from lora_pipeline.core.training.kohya.lora_file import LoraProvenance
from lora_pipeline.core.training.progress import Progress
from lora_pipeline.core.training.run.checkpoint import step_file_name
from lora_pipeline.core.training.run.result import TrainResult
from lora_pipeline.core.training.run.samples import SampleRenderer, latest_strip, strip_path
from lora_pipeline.core.training.run.saving import save_epoch, save_lora_file, writes
from lora_pipeline.core.training.run.setup import DTYPES, TrainingRun, build_context, finish_latent_cache
from lora_pipeline.core.training.run.tracking import TrainingTracker, loss_curve_png
from lora_pipeline.core.training.run.warmup import warm_up_shapes
from lora_pipeline.core.training.run.writer import BackgroundWriter
from lora_pipeline.core.training.step.ema import ema_applied
from lora_pipeline.core.training.step.fastpath import GraphedSteps
from lora_pipeline.core.training.step.loop import (
    EpochStats,
    StepContext,
    require_agreement,
    run_epoch,
)
from lora_pipeline.core.training.step.optim import averaged_weights

LOSS_CURVE = "loss_curve.png"
# Host work of a run besides its GPU stages, timed for the asset's metadata (TrainResult.timings)
HOST_STAGES = ("data", "base_model_hash", "network", "optimizer", "tracking", "loss_curve")
WRITER_STAGES = ("writer_epoch_file", "writer_resume_state", "writer_mlflow")  # the background writer's jobs


def _epoch(run: TrainingRun, ctx: StepContext, provenance: LoraProvenance, epoch: int, global_step: int,
           step_files: list[str], writer: BackgroundWriter) -> tuple[EpochStats, int]:
    """Train one epoch (cut at the run's last step), writing step files on the way; (stats, its steps)."""
    recipe = run.recipe
    batches = epoch_batches(run.data.images, run.data.image_repeats, recipe.effective_batch_size, recipe.seed,
                            epoch)
    batches = batches[:run.total - global_step]
    every = recipe.save_every_n_steps or len(batches) + global_step + 1
    stats, done = [], 0
    if ctx.progress is not None:  # once per epoch: step files cut it into several run_epoch calls
        ctx.progress.begin_epoch(epoch, len(batches), global_step + 1)
    while done < len(batches):
        chunk = batches[done:done + every - (global_step + done) % every]
        stats.append(run_epoch(ctx, epoch, chunk, global_step + done + 1))
        done += len(chunk)
        if recipe.save_every_n_steps and (global_step + done) % every == 0 and writes(ctx):
            path = run.out_dir / step_file_name(run.version, recipe.name, global_step + done)
            saving = time.perf_counter()
            save_lora_file(run, ctx, provenance, epoch, global_step + done, path, writer)
            run.times.add("saving", time.perf_counter() - saving)
            step_files.append(str(path))
    return EpochStats.merged(stats), len(batches)


def _sample(run: TrainingRun, ctx: StepContext, renderer: SampleRenderer, epoch: int,
            tracker: TrainingTracker | None, writer: BackgroundWriter) -> None:
    every = run.recipe.sample_every_n_epochs
    if not every or (epoch % every and epoch != run.last_epoch) or not writes(ctx):
        return
    with averaged_weights(ctx.parts.optimizer), ema_applied(ctx.ema), run.times.stage("sampling"):
        path = renderer.render(strip_path(run.out_dir, run.version, run.recipe.name, epoch))
    if tracker is not None:
        writer.submit(lambda: tracker.log_image(path, "samples", epoch))


def _log_epoch(run: TrainingRun, tracker: TrainingTracker, saved: list[dict], losses: list[float],
               lrs: list[float]) -> None:
    """The writer's MLflow job after an epoch: the steps so far and the epoch files written so far."""
    with run.times.host("writer_mlflow"):
        tracker.log_steps(losses, lrs)
        tracker.log_files([run.out_dir / rec["file"] for rec in saved], "epochs")


def train_steps(run: TrainingRun, provenance: LoraProvenance, tracker: TrainingTracker | None) -> TrainResult:
    """Build the step context and train the run's remaining epochs (see the module docstring)."""
    recipe, state = run.recipe, run.state
    ctx = build_context(run)
    flip = flip_warning([i.caption for i in run.data.train]) if run.flip_aug else None
    warnings = [flip] if flip else []
    if run.accumulation < recipe.gradient_accumulation_steps:
        warnings.append(f"gradient_accumulation_steps: {recipe.gradient_accumulation_steps} accumulates at most "
                        f"{run.accumulation} batch(es) of {recipe.train_batch_size} here: a step stays inside one "
                        "aspect-ratio bucket and no bucket holds more images (the LoRA header records "
                        f"{run.accumulation})")
    for line in warnings:
        run.log(f"warning: {line}")
    renderer = SampleRenderer(run.base, recipe.sampling, recipe.v_parameterization, run.device, DTYPES[run.precision])
    per_epoch, total = run.per_epoch, run.total
    ctx.progress = Progress(run.log, run.last_epoch, total, recipe.effective_batch_size)
    start = state.epoch if state else 0
    global_step = state.global_step if state else 0
    losses, lrs = (list(state.losses), list(state.lrs)) if state else ([], [])
    saved = list(state.saved) if state else []
    trained_images, seconds, warmup, first_step_done, step_files = 0, 0.0, 0.0, None, []
    with BackgroundWriter(run.device) as writer:
        if state:
            run.log(f"resuming {run.version}/{recipe.name} after epoch {start}/{run.last_epoch} (step {global_step})")
        if ctx.shard:
            require_agreement(ctx.parts.accelerator, start_epoch=start, global_step=global_step, total_steps=total)
        try:
            run.times.add("warmup_ahead", warm_up_shapes(run, ctx))  # the fast path's shapes
        except BaseException:
            ctx.latents.close()  # filled beside the warm-up on a GPU
            raise
        finish_latent_cache(run, ctx)  # before anything else uses the VAE
        if run.model_hash is not None:
            run.model_hash.start()  # read while the first epoch trains (TrainingRun.settled)
        if state and not strip_path(run.out_dir, run.version, recipe.name, start).is_file():  # killed while it
            _sample(run, ctx, renderer, start, tracker, writer)  # rendered: the weights (put back) are that epoch's
        for epoch in range(start + 1, run.last_epoch + 1):
            stats, steps = _epoch(run, ctx, provenance, epoch, global_step, step_files, writer)
            global_step += steps
            losses += stats.losses
            lrs += stats.lrs
            trained_images += stats.images
            seconds += stats.seconds
            warmup += stats.warmup_seconds
            first_step_done = first_step_done or stats.first_step_done
            mean_loss = statistics.fmean(stats.losses)
            saving = time.perf_counter()
            if (epoch % recipe.save_every_n_epochs == 0 or epoch == run.last_epoch) and writes(ctx):
                save_epoch(run, ctx, provenance, epoch, global_step, mean_loss, (saved, losses, lrs), writer)
            if tracker is not None:
                writer.submit(functools.partial(_log_epoch, run, tracker, saved, list(losses), list(lrs)))
            run.times.add("saving", time.perf_counter() - saving)
            _sample(run, ctx, renderer, epoch, tracker, writer)
            run.log(
                f"epoch {epoch}/{run.last_epoch}: {steps} steps, mean loss {mean_loss:.4f}, "
                f"{stats.images / max(stats.seconds, 1e-9):.1f} images/s, lr {lrs[-1]:.3g}"
            )
        draining = time.perf_counter()
        writer.wait()  # the last epoch's files and logging; raises a failed write's error
        run.times.add("saving", time.perf_counter() - draining)
        run.times.add("saving_background", writer.busy_seconds)
    run.peak.mark("training")
    curve = run.out_dir / LOSS_CURVE
    if writes(ctx):
        with run.times.host("loss_curve"):
            loss_curve_png(losses, curve, steps_per_epoch=per_epoch,
                           title=f"{run.version}/{recipe.name} training loss")
    if tracker is not None:
        with run.times.host("tracking"):
            tracker.log_steps(losses, lrs)
            tracker.log_files([run.out_dir / rec["file"] for rec in saved], "epochs")
            tracker.log_files([curve], overwrite=True)
    timings = _timings(run, seconds, warmup, first_step_done)
    if tracker is not None:
        tracker.log_values({f"seconds_{name}": value for name, value in timings.items()})
        tracker.log_values({f"latent_cache_{name}": value for name, value in ctx.latents.stats.as_dict().items()})
        tracker.log_values({f"peak_memory_gib_{name}": value for name, value in run.peak.gib.items()})
    return TrainResult(
        version=run.version, recipe=recipe.name, out_dir=run.out_dir,
        epochs=[{**rec, "file": str(run.out_dir / rec["file"])} for rec in saved],
        loss_history=losses, lr_history=lrs, images_per_second=trained_images / seconds if seconds else 0.0,
        images_trained=trained_images,
        resumed_from_epoch=start, steps_per_epoch=per_epoch, total_steps=total,
        mlflow_run_id=provenance.mlflow_run_id, loss_curve=curve, device=str(run.device),
        mixed_precision=run.precision, validation_images=[image.rel for image in run.data.validation],
        fast_path=isinstance(ctx.update, GraphedSteps), timings=timings, latent_cache=ctx.latents.stats.as_dict(),
        warnings=warnings, peak_memory_gib=run.peak.gib,
        step_files=step_files, sample_strip=latest_strip(run.out_dir, run.version, recipe.name, run.last_epoch),
    )


def _timings(run: TrainingRun, step_seconds: float, warmup: float, first_step_done: float | None) -> dict[str, float]:
    """TrainResult.timings: the stage split of this call (see there)."""
    stages = run.times.seconds()
    text = stages.get("text_encoding", 0.0)
    timings = {
        "load": stages.get("load", 0.0), "latent_caching": stages.get("latent_caching", 0.0),
        "latent_caching_background": stages.get("latent_caching_background", 0.0),
        "text_encoding": text, "training_steps": max(0.0, step_seconds - text), "shape_warmup": warmup,
        "warmup_ahead": stages.get("warmup_ahead", 0.0),
        "saving": stages.get("saving", 0.0), "saving_background": stages.get("saving_background", 0.0),
        "sampling": stages.get("sampling", 0.0),
        **{name: stages.get(name, 0.0) for name in (*HOST_STAGES, *WRITER_STAGES)},
    }
    if first_step_done is not None:
        timings["time_to_first_step"] = first_step_done - run.called_at
    return timings
