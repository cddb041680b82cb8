"""`train_lora`: a LoRA on a dataset snapshot, one kohya-format file per saved epoch, resumable.

The base model's VAE is frozen; kohya's U-Net modules carry LoRA (network.py: attention, with `conv_dim` also
the ResNet and sampler convolutions; DoRA with `use_dora`) and, with `network_train_unet_only: false`, the text
encoders too (their outputs are then not cached). A run stops after `epochs` or at `max_train_steps`, whichever
comes first, and saves there; `save_every_n_steps` also writes step files (`-stepNNNNNNNN`), and
`sample_every_n_epochs` renders sample strips (samples.py). On CUDA the run uses the recipe's mixed precision
through accelerate (frozen weights in that dtype, LoRA weights float32), SDPA attention
(diffusers' default) and, when the recipe asks, gradient checkpointing. On CPU it runs in float32 with
deterministic algorithms, so the same inputs give byte-identical files; see seeds.py and checkpoint.py for
reproducibility and resume. Launched in several processes (distributed.py) every process trains its share
of each batch (loop.Shard) and only the first one writes files, samples and the MLflow run.

`provenance` may name `code_commit` (default: this checkout's) and `mlflow_run_id` (without a tracker);
the keys the trainer derives itself (dataset_version, manifest_root, spec_sha256, recipe_sha256,
base_model_source, base_model_hash) may be passed too and must then agree with what it reads.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from accelerate import PartialState

from lora_pipeline.core.codeversion import code_version
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.models.loading import BaseModel, base_model_hash, default_device, load_base_model
from lora_pipeline.core.models.model_hash import weights_hash
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.training.inputs.augment import flip_warning
from lora_pipeline.core.training.inputs.data import (
    TrainingData,
    accumulation_in_effect,
    epoch_batches,
    load_training_data,
    steps_per_epoch,
)
from lora_pipeline.core.training.inputs.encode import LatentSource, TextSource
from lora_pipeline.core.training.inputs.latent_cache import LatentDiskCache
from lora_pipeline.core.training.inputs.text_cache import TextDiskCache
from lora_pipeline.core.training.kohya.lora_file import LoraProvenance, build_metadata, save_lora
from lora_pipeline.core.training.kohya.network import add_network, kohya_state_dict, param_groups, trainable
from lora_pipeline.core.training.progress import Progress, training_threads
from lora_pipeline.core.training.recipe import Recipe, fast_path_blockers
from lora_pipeline.core.training.run.checkpoint import (
    ResumeState,
    epoch_file_name,
    resume_point,
    save_state,
    step_file_name,
)
from lora_pipeline.core.training.run.memory import PeakMemory, lighten_denoiser
from lora_pipeline.core.training.run.result import TrainResult, own_output
from lora_pipeline.core.training.run.samples import SampleRenderer, latest_strip, strip_path
from lora_pipeline.core.training.run.tracking import TrainingTracker, loss_curve_png
from lora_pipeline.core.training.step.fastpath import GraphedSteps, fast_path_choice
from lora_pipeline.core.training.step.loop import (
    EpochStats,
    Shard,
    StepContext,
    StepParts,
    make_accelerator,
    require_agreement,
    run_epoch,
    update,
)
from lora_pipeline.core.training.step.norms import norms_in_dtype
from lora_pipeline.core.training.step.objective import training_objective
from lora_pipeline.core.training.step.optim import averaged_weights, make_lr_scheduler, make_optimizer
from lora_pipeline.core.training.timing import StageTimes

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LOSS_CURVE = "loss_curve.png"
LATENT_CACHE = "latents"  # under the data root's .cache/ (latent_cache.py)
TEXT_CACHE = "text"  # under the data root's .cache/ (text_cache.py)
DERIVED = ("dataset_version", "manifest_root", "spec_sha256", "recipe_sha256", "base_model_source", "base_model_hash")
PROVENANCE_KEYS = {*DERIVED, "code_commit", "mlflow_run_id"}


def _provenance(given: Mapping[str, str], derived: dict[str, str], run_id: str) -> LoraProvenance:
    unknown = sorted(set(given) - PROVENANCE_KEYS)
    if unknown:
        raise ValueError(f"unknown provenance keys: {', '.join(unknown)}")
    for key, value in given.items():
        if key in derived and value != derived[key]:
            raise ValueError(f"provenance {key}={value!r} disagrees with the trainer's {derived[key]!r}")
    if given.get("mlflow_run_id") and run_id and given["mlflow_run_id"] != run_id:
        raise ValueError(f"provenance mlflow_run_id={given['mlflow_run_id']!r} but the tracker's run is {run_id!r}")
    names = {f.name for f in fields(LoraProvenance)}
    values = {**{k: v for k, v in derived.items() if k in names}, "code_commit": given.get("code_commit") or
              code_version(), "mlflow_run_id": run_id or given.get("mlflow_run_id", "")}
    return LoraProvenance(**values)


@dataclass
class _Run:
    """What the epoch loop needs besides the step context."""

    root: DataRoot
    version: str
    recipe: Recipe
    out_dir: Path
    data: TrainingData
    base: BaseModel
    derived: dict[str, str]
    key: dict[str, str]  # what a resume state must match
    state: ResumeState | None
    started_at: float
    device: torch.device
    precision: str
    log: Callable[[str], None]
    times: StageTimes
    called_at: float  # perf_counter at train_lora's start
    peak: PeakMemory = field(init=False)  # the GPU's peak memory: "caching" (up to training) and "training"

    def __post_init__(self) -> None:
        self.peak = PeakMemory(self.device)

    @property
    def flip_aug(self) -> bool:
        """Whether images are mirrored: the recipe's flip_aug or the dataset spec's (kohya's two places)."""
        return self.recipe.flip_aug or self.data.flip_aug

    @property
    def per_epoch(self) -> int:
        """Optimizer steps per epoch (batches of train_batch_size x gradient_accumulation_steps)."""
        return steps_per_epoch(self.data.images, self.data.image_repeats, self.recipe.effective_batch_size)

    @property
    def accumulation(self) -> int:
        """The batches a step accumulates at most (`accumulation_in_effect`): the header records this."""
        recipe = self.recipe
        return accumulation_in_effect(self.data.images, self.data.image_repeats, recipe.train_batch_size,
                                      recipe.gradient_accumulation_steps)

    @property
    def total(self) -> int:
        """Optimizer steps of the whole run: `epochs`, cut at max_train_steps."""
        return min(self.per_epoch * self.recipe.epochs, self.recipe.max_train_steps or self.per_epoch * 10**7)

    @property
    def last_epoch(self) -> int:
        return -(-self.total // self.per_epoch)


@own_output
def train_lora(
    root: DataRoot,
    version: str,
    recipe: Recipe,
    *,
    out_dir: Path,
    provenance: Mapping[str, str],
    tracker: TrainingTracker | None = None,
    log: Callable[[str], None] = print,
    device: str | None = None,
    started_at: float | None = None,
) -> TrainResult:
    """Train (or resume) a LoRA of `recipe` on dataset `version`; see the module docstring.

    `started_at` (unix time, default now) goes into every header as kohya's ss_training_started_at; a
    resumed run keeps the one of the run it continues.
    """
    called_at = time.perf_counter()
    data = load_training_data(root.dataset(version), recipe.buckets, recipe.validation_split)
    if recipe.masked_loss and not data.has_masks:
        raise UserError(f"masked_loss: true but dataset '{version}' has no masks (a spec source's masks: file "
                        "or alpha)", root.recipe_file(recipe.name))
    if recipe.fast_path and (blockers := fast_path_blockers(recipe, dataset=data)):
        raise UserError(f"fast_path: true is impossible on dataset '{version}': {blockers[0]}; set fast_path: false",
                        root.recipe_file(recipe.name))
    if data.has_masks and not recipe.masked_loss:
        log(f"dataset {version} has loss masks; masked_loss is off, so they are not used")
    target = default_device(device)
    precision = recipe.mixed_precision if target.type == "cuda" else "no"
    times = StageTimes(target)
    loading = time.perf_counter()
    base = load_base_model(root.models, recipe.base_model, recipe.model_family, "cpu", DTYPES[precision],
                           recipe.t5xxl_max_token_length)
    times.add("load", time.perf_counter() - loading)
    derived = {
        "dataset_version": version, "manifest_root": data.manifest_root, "spec_sha256": data.spec_sha256,
        "recipe_sha256": recipe.sha256, "base_model_source": base.source,
        "base_model_hash": base_model_hash(base.source),
    }
    key = {k: derived[k] for k in ("recipe_sha256", "manifest_root", "base_model_hash")}
    with PartialState().main_process_first():  # in several processes the first one removes stale files
        state = resume_point(out_dir, version, recipe.name, key, log)
    run = _Run(root, version, recipe, out_dir, data, base, derived, key, state,
               state.started_at if state else started_at if started_at is not None else time.time(),
               target, precision, log, times, called_at)
    if tracker is None:
        return _train(run, _provenance(provenance, derived, ""), None)
    tags = {"dataset_version": version, "recipe": recipe.name, "manifest_root": data.manifest_root,
            "recipe_sha256": recipe.sha256}
    resume_id = state.provenance.get("mlflow_run_id") if state else None
    params = {**recipe.resolved(), "effective_batch_size": recipe.effective_batch_size,
              **({"flip_aug": True} if run.flip_aug else {})}  # the spec's flip_aug counts too
    with tracker.run(f"{version}/{recipe.name}", params=params, tags=tags, resume_run_id=resume_id) as rid:
        held_out = {i.rel for i in data.validation}
        rows = [{**row.to_json_dict(), "split": "validation" if row.path in held_out else "train"}
                for row in data.image_rows]
        tracker.log_dataset(rows, name=version, digest=data.manifest_root, source=str(data.snapshot_dir))
        return _train(run, _provenance(provenance, derived, rid), tracker)


def _train(run: _Run, provenance: LoraProvenance, tracker: TrainingTracker | None) -> TrainResult:
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(run.device.type == "cpu" or deterministic)
    threads = torch.get_num_threads()
    wanted = training_threads() if run.device.type == "cpu" else None
    if wanted is not None:
        torch.set_num_threads(wanted)
        run.log(f"CPU training on {wanted} thread(s) (1-minute load {os.getloadavg()[0]:.1f})")
    try:
        return _train_steps(run, provenance, tracker)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _build_context(run: _Run) -> StepContext:
    recipe, base, device = run.recipe, run.base, run.device
    dtype = DTYPES[run.precision]
    unet = base.denoiser
    noise, augmentation = recipe.noise, replace(recipe.augmentation, flip_aug=run.flip_aug)
    add_network(run.base, recipe.network, recipe.seed, run.state.lora if run.state else None)
    flow = training_objective(base, noise, recipe.flow)
    train_text = not recipe.network_train_unet_only
    unet.train()  # no dropout or batch norm in the U-Net; needed for gradient checkpointing
    moving = time.perf_counter()
    # default memory format: channels-last weights were 5-6% slower (benchmarks/RESULTS.md)
    swap = lighten_denoiser(unet, base.architecture, recipe, device)
    if run.precision != "no":
        norms_in_dtype(unet, dtype)  # frozen norms in bf16/fp16, not autocast's float32 round trip
    base.vae.to(device)
    for encoder in base.text_encoders:
        encoder.to(device)
    run.times.add("load", time.perf_counter() - moving)
    images = run.data.images
    dropout = augmentation.caption_dropout
    disk = None
    if recipe.cache_latents_to_disk:
        disk = LatentDiskCache(run.root.cache / LATENT_CACHE, weights_hash(base.source, "vae"), run.log)
    with run.times.stage("latent_caching"):
        latents = LatentSource(base, images, recipe.seed, recipe.cache_latents, device, run.flip_aug, disk)
    if train_text:
        run.log("text-encoder outputs are not cached: the text encoders carry a LoRA that trains "
                "(network_train_unet_only: false)")
    # whole captions (or "") recur, and the text encoders are frozen
    fixed_captions = not augmentation.shuffle_caption and not dropout.tag_rate and not train_text
    cached = [i.caption for i in images] + ([""] if dropout.on else []) if fixed_captions else ()
    text_disk = None
    if recipe.cache_text_encoder_outputs_to_disk:  # the recipe made sure that captions are fixed
        text_disk = TextDiskCache.for_model(base, run.root.cache / TEXT_CACHE, run.log)
    text = TextSource(base, dtype, device, cached, run.times, train=train_text, disk=text_disk)
    if device.type == "cuda":  # what the cache made unnecessary leaves the GPU
        if recipe.cache_latents:
            base.vae.to("cpu")
        if fixed_captions:
            for encoder in base.text_encoders:
                encoder.to("cpu")
    run.peak.mark("caching")  # the VAE and the text encoders' peak, before training
    params = list(trainable(base).values())
    optimizer = make_optimizer(recipe.optimizer_settings, recipe.schedule, param_groups(base, recipe.text_encoder_lr),
                               device)
    lr_scheduler = make_lr_scheduler(recipe.optimizer_settings, recipe.schedule, optimizer, run.total)
    accelerator = make_accelerator(device, run.precision)
    # the denoiser is on the device already, but for the swapped blocks' weights, which must stay on the CPU
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler,
                                                        device_placement=[swap is None, True, True])
    if run.state is not None:
        optimizer.load_state_dict(run.state.optimizer)
        lr_scheduler.load_state_dict(run.state.lr_scheduler)
    parts = StepParts(unet, base.noise_scheduler, noise, accelerator, optimizer, params, flow)
    fast_path, why = fast_path_choice(recipe, device, run.data, accelerator.num_processes)
    if device.type == "cuda":  # on a CPU there is nothing to choose
        run.log(why)
    return StepContext(
        parts=parts, update=GraphedSteps(parts, device) if fast_path else functools.partial(update, parts),
        lr_scheduler=lr_scheduler, images=images, latents=latents, text=text, seed=recipe.seed,
        augmentation=augmentation, micro_conditioning=base.architecture.micro_conditioning, dtype=dtype,
        warmup_steps_per_shape=2 if fast_path else 1,
        masked_loss=recipe.masked_loss, prior_loss_weight=recipe.prior_loss_weight if run.data.reg else None,
        micro_batch=recipe.train_batch_size if recipe.gradient_accumulation_steps > 1 else 0,
        shard=Shard(accelerator.process_index, accelerator.num_processes) if accelerator.num_processes > 1 else None,
    )


def _save_lora(run: _Run, ctx: StepContext, provenance: LoraProvenance, epoch: int, global_step: int,
               path: Path) -> str:
    """Write the LoRA as it stands (for a schedule-free optimizer: its averaged weights) to `path`."""
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
        gradient_accumulation_steps=run.accumulation,
    )
    encoders = None if recipe.network_train_unet_only else run.base.text_encoders
    with averaged_weights(ctx.parts.optimizer):
        tensors = kohya_state_dict(unet, recipe.model_family, recipe.network_alpha, text_encoders=encoders)
    return save_lora(path, tensors, metadata)


def _writes(ctx: StepContext) -> bool:
    """Whether this process writes the run's files: the only one, or the first of several (DDP)."""
    return ctx.parts.accelerator.is_main_process


def _epoch(run: _Run, ctx: StepContext, provenance: LoraProvenance, epoch: int, global_step: int,
           step_files: list[str]) -> tuple[EpochStats, int]:
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
        if recipe.save_every_n_steps and (global_step + done) % every == 0 and _writes(ctx):
            path = run.out_dir / step_file_name(run.version, recipe.name, global_step + done)
            _save_lora(run, ctx, provenance, epoch, global_step + done, path)
            step_files.append(str(path))
    return EpochStats.merged(stats), len(batches)


def _sample(run: _Run, ctx: StepContext, renderer: SampleRenderer, epoch: int,
            tracker: TrainingTracker | None) -> None:
    every = run.recipe.sample_every_n_epochs
    if not every or (epoch % every and epoch != run.last_epoch) or not _writes(ctx):
        return
    with averaged_weights(ctx.parts.optimizer), run.times.stage("sampling"):
        path = renderer.render(strip_path(run.out_dir, run.version, run.recipe.name, epoch))
    if tracker is not None:
        tracker.log_image(path, "samples", epoch)


def _train_steps(run: _Run, provenance: LoraProvenance, tracker: TrainingTracker | None) -> TrainResult:
    recipe, state = run.recipe, run.state
    ctx = _build_context(run)
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
    if state:
        run.log(f"resuming {run.version}/{recipe.name} after epoch {start}/{run.last_epoch} (step {global_step})")
        if not strip_path(run.out_dir, run.version, recipe.name, start).is_file():  # killed while it rendered:
            _sample(run, ctx, renderer, start, tracker)  # the restored weights and optimizer are that epoch's
    if ctx.shard:
        require_agreement(ctx.parts.accelerator, start_epoch=start, global_step=global_step, total_steps=total)
    trained_images, seconds, warmup, first_step_done, step_files = 0, 0.0, 0.0, None, []
    for epoch in range(start + 1, run.last_epoch + 1):
        stats, steps = _epoch(run, ctx, provenance, epoch, global_step, step_files)
        global_step += steps
        losses += stats.losses
        lrs += stats.lrs
        trained_images += stats.images
        seconds += stats.seconds
        warmup += stats.warmup_seconds
        first_step_done = first_step_done or stats.first_step_done
        mean_loss = statistics.fmean(stats.losses)
        saving = time.perf_counter()
        if (epoch % recipe.save_every_n_epochs == 0 or epoch == run.last_epoch) and _writes(ctx):
            path = run.out_dir / epoch_file_name(run.version, recipe.name, epoch)
            sha = _save_lora(run, ctx, provenance, epoch, global_step, path)
            saved.append({"epoch": epoch, "file": path.name, "steps": global_step, "mean_loss": mean_loss,
                          "sha256": sha})
            save_state(run.out_dir, ResumeState(
                key=run.key,
                epoch=epoch, global_step=global_step, started_at=run.started_at, provenance=asdict(provenance),
                saved=saved, losses=losses, lrs=lrs,
                lora={n: p.detach().cpu().clone() for n, p in trainable(run.base).items()},
                optimizer=ctx.parts.optimizer.state_dict(), lr_scheduler=ctx.lr_scheduler.state_dict(),
            ))
        _sample(run, ctx, renderer, epoch, tracker)
        if tracker is not None:
            tracker.log_steps(losses, lrs)
            tracker.log_files([run.out_dir / rec["file"] for rec in saved], "epochs")
        run.times.add("saving", time.perf_counter() - saving)
        run.log(
            f"epoch {epoch}/{run.last_epoch}: {steps} steps, mean loss {mean_loss:.4f}, "
            f"{stats.images / max(stats.seconds, 1e-9):.1f} images/s, lr {lrs[-1]:.3g}"
        )
    timings = _timings(run, seconds, warmup, first_step_done)
    run.peak.mark("training")
    curve = run.out_dir / LOSS_CURVE
    if _writes(ctx):
        loss_curve_png(losses, curve, steps_per_epoch=per_epoch, title=f"{run.version}/{recipe.name} training loss")
    if tracker is not None:
        tracker.log_steps(losses, lrs)
        tracker.log_files([run.out_dir / rec["file"] for rec in saved], "epochs")
        tracker.log_files([curve], overwrite=True)
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


def _timings(run: _Run, step_seconds: float, warmup: float, first_step_done: float | None) -> dict[str, float]:
    """TrainResult.timings: the stage split of this call (see there)."""
    stages = run.times.seconds()
    text = stages.get("text_encoding", 0.0)
    timings = {
        "load": stages.get("load", 0.0), "latent_caching": stages.get("latent_caching", 0.0),
        "text_encoding": text, "training_steps": max(0.0, step_seconds - text), "shape_warmup": warmup,
        "saving": stages.get("saving", 0.0), "sampling": stages.get("sampling", 0.0),
    }
    if first_step_done is not None:
        timings["time_to_first_step"] = first_step_done - run.called_at
    return timings
