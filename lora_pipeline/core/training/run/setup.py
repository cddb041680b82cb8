"""Setting up a run: `TrainingRun` (what `train_lora` was given and what it derived: the data, the base model, the
resume state, the step counts, the base model's hash read while training: `BaseModelHash`) and `build_context`,
which puts the LoRA on the base model, moves the frozen parts where they train, fills the latent cache (on a GPU
with the fast path in the background, until `finish_latent_cache`) and the text cache and builds the optimizer,
schedule and step (the captured fast path where it can) into the epoch loop's `StepContext`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import PartialState

from lora_pipeline.core.models.loading import BaseModel, vae_encoding_dtype
from lora_pipeline.core.models.model_hash import base_model_hash, weights_hash
from lora_pipeline.core.models.sampling import quiet_diffusers
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.training.inputs.data import (
    TrainingData,
    accumulation_in_effect,
    epoch_batches,
    steps_per_epoch,
)
from lora_pipeline.core.training.inputs.encode import LatentSource, TextSource
from lora_pipeline.core.training.inputs.latent_cache import LatentDiskCache
from lora_pipeline.core.training.inputs.text_cache import TextDiskCache
from lora_pipeline.core.training.kohya.lora_file import LoraProvenance
from lora_pipeline.core.training.kohya.network import add_network, block_lr, param_groups, trainable
from lora_pipeline.core.training.kohya.rights_keys import rights_metadata
from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline.core.training.recipe_checks import GRAPH_SAFE_OPTIMIZERS
from lora_pipeline.core.training.run.background import in_background
from lora_pipeline.core.training.run.checkpoint import ResumeState
from lora_pipeline.core.training.run.memory import PeakMemory, lighten_denoiser
from lora_pipeline.core.training.run.start_lora import StartLora, load_start_lora
from lora_pipeline.core.training.step.ema import LoraEma
from lora_pipeline.core.training.step.fastpath import GraphedSteps, fast_path_choice
from lora_pipeline.core.training.step.loop import (
    Shard,
    StepContext,
    StepParts,
    make_accelerator,
    update,
)
from lora_pipeline.core.training.step.lora_fused import fuse_lora_linears
from lora_pipeline.core.training.step.norms import lora_inputs_uncast, norms_in_dtype
from lora_pipeline.core.training.step.objective import training_objective
from lora_pipeline.core.training.step.optim import groups_to_device, make_lr_scheduler, make_optimizer
from lora_pipeline.core.training.timing import StageTimes

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LATENT_CACHE = "latents"  # under the data root's .cache/ (latent_cache.py)
TEXT_CACHE = "text"  # under the data root's .cache/ (text_cache.py)


PENDING_HASH = ""  # the base model's hash in `derived` and `key` until TrainingRun.settled fills it in


class BaseModelHash:
    """The denoiser's sha256 (models.base_model_hash), read by a thread of its own once `start`ed; `value` waits
    for it (the wait is timed as `base_model_hash`). Seconds for a model met the first time (4.4 s for SDXL's
    5 GB U-Net on an H100 host), nothing once the hash cache knows the file."""

    def __init__(self, source: str, cache: Path, times: StageTimes):
        self.source, self.cache, self.times = source, cache, times
        self._future: Future[str] | None = None

    def start(self) -> None:
        if self._future is None:
            self._future = in_background("base-model-hash", base_model_hash, self.source, cache=self.cache)

    def value(self) -> str:
        self.start()
        assert self._future is not None
        with self.times.host("base_model_hash"):
            return self._future.result()


@dataclass
class TrainingRun:
    """A run as train_lora set it up: what the epoch loop needs besides the step context."""

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
    start: StartLora | None = None  # from_lora: the LoRA the adapters start from (a resumed run: its state)
    clock: Callable[[], float] = time.time  # unix time of a file's save (kohya's ss_training_finished_at)
    model_hash: BaseModelHash | None = None  # where `derived` holds PENDING_HASH: read while training
    peak: PeakMemory = field(init=False)  # the GPU's peak memory: "caching" (up to training) and "training"

    def __post_init__(self) -> None:
        self.peak = PeakMemory(self.device)

    def settled(self, provenance: LoraProvenance) -> LoraProvenance:
        """`provenance` with the base model's hash, which `derived` and `key` then hold too: read (or waited for)
        here, before the first file that records it is written."""
        if self.derived["base_model_hash"] == PENDING_HASH:
            assert self.model_hash is not None
            self.derived["base_model_hash"] = self.key["base_model_hash"] = self.model_hash.value()
        return replace(provenance, base_model_hash=self.derived["base_model_hash"])

    @functools.cached_property
    def rights_keys(self) -> dict[str, str]:
        """The header's rights keys (kohya/rights_keys.py), read from the version's manifest once a run."""
        return rights_metadata(self.data.snapshot_dir)

    @property
    def flip_aug(self) -> bool:
        """Whether images are mirrored: the recipe's flip_aug or the dataset spec's (kohya's two places)."""
        return self.recipe.flip_aug or self.data.flip_aug

    @property
    def accumulation(self) -> int:
        """The batches a step accumulates at most (`accumulation_in_effect`): the header records this."""
        recipe = self.recipe
        return accumulation_in_effect(self.data.images, self.data.image_repeats, recipe.train_batch_size,
                                      recipe.gradient_accumulation_steps)

    @property
    def per_epoch(self) -> int:
        """Optimizer steps per epoch (batches of train_batch_size x gradient_accumulation_steps)."""
        return steps_per_epoch(self.data.images, self.data.image_repeats, self.recipe.effective_batch_size)

    @property
    def total(self) -> int:
        """Optimizer steps of the whole run: `epochs`, cut at max_train_steps."""
        return min(self.per_epoch * self.recipe.epochs, self.recipe.max_train_steps or self.per_epoch * 10**7)

    @property
    def last_epoch(self) -> int:
        return -(-self.total // self.per_epoch)

    @functools.cached_property
    def planned_shapes(self) -> list[tuple[int, int, list[int]]]:
        """(epoch, global step, image indices) of the first batch of each distinct shape (size, bucket) that this
        call trains: from the epoch after the resume state's (or the first) on; empty when none is left."""
        recipe, images = self.recipe, self.data.images
        found: dict[tuple[int, tuple[int, int]], tuple[int, int, list[int]]] = {}
        step = self.state.global_step if self.state else 0
        for epoch in range((self.state.epoch if self.state else 0) + 1, self.last_epoch + 1):
            batches = epoch_batches(images, self.data.image_repeats, recipe.effective_batch_size, recipe.seed, epoch)
            for indices in batches[:self.total - step]:
                step += 1
                found.setdefault((len(indices), images[indices[0]].bucket), (epoch, step, indices))
        return list(found.values())


def build_context(run: TrainingRun) -> StepContext:
    """The step context of the run (see the module docstring); the text encoders leave the GPU where the text
    cache made them unnecessary (the VAE once the latent cache is full: `finish_latent_cache`)."""
    recipe, base, device = run.recipe, run.base, run.device
    dtype = DTYPES[run.precision]
    unet = base.denoiser
    noise, augmentation = recipe.noise, replace(recipe.augmentation, flip_aug=run.flip_aug)
    with run.times.host("network"):
        add_network(run.base, recipe.network, recipe.seed, run.state.lora if run.state else None)
        if run.start is not None and run.state is None:
            load_start_lora(base, recipe, run.start)
            run.log(f"starting from LoRA {run.start.named} (sha256 {run.start.sha256[:12]}…)")
    flow = training_objective(base, noise, recipe.flow)
    train_text = not recipe.network_train_unet_only
    unet.train()  # no dropout or batch norm in the U-Net; needed for gradient checkpointing
    moving = time.perf_counter()
    # default memory format: channels-last weights were 5-6% slower (benchmarks/RESULTS.md)
    swap = lighten_denoiser(unet, base.architecture, recipe, device)
    if run.precision != "no":
        norms_in_dtype(unet, dtype)  # frozen norms in bf16/fp16, not autocast's float32 round trip
        lora_inputs_uncast(unet)  # nor peft's float32 copy of each LoRA layer's input
    fuse_lora_linears(unet)  # the LoRA branch and its base layer in fewer passes over the activations
    with quiet_diffusers():  # "cast with to()": the VAE's dtype is the point here
        base.vae.to(device, vae_encoding_dtype(run.precision, recipe.no_half_vae))
    for encoder in base.text_encoders:
        encoder.to(device)
    run.times.add("load", time.perf_counter() - moving)
    images = run.data.images
    dropout = augmentation.caption_dropout
    disk = None
    if recipe.cache_latents_to_disk:
        vae_hash = weights_hash(base.source, "vae", cache=run.root.cache)
        disk = LatentDiskCache(run.root.cache / LATENT_CACHE, vae_hash, run.log)
    fast_path, why = fast_path_choice(recipe, device, PartialState().num_processes)
    # With the fast path on a GPU the VAE fills the cache beside the text encoding and the warm-up (its
    # captures are host work): the first batch of each shape first, which the warm-up takes
    state = run.state
    latents = LatentSource(base, images, recipe.seed, recipe.cache_latents, device, run.flip_aug, disk,
                           first=[index for _, _, indices in run.planned_shapes for index in indices],
                           background=fast_path and device.type == "cuda")
    if train_text:
        run.log("text-encoder outputs are not cached: the text encoders carry a LoRA that trains "
                "(network_train_unet_only: false)")
    # whole captions (or "") recur, and the text encoders are frozen
    fixed_captions = not augmentation.shuffle_caption and not dropout.tag_rate and not train_text
    cached = [i.caption for i in images] + ([""] if dropout.on else []) if fixed_captions else ()
    text_disk = None
    if recipe.cache_text_encoder_outputs_to_disk:  # the recipe made sure that captions are fixed
        text_disk = TextDiskCache.for_model(base, run.root.cache / TEXT_CACHE, run.log)
    text = TextSource(base, dtype, device, cached, run.times, train=train_text, disk=text_disk,
                      in_step=not fixed_captions)
    if device.type == "cuda" and fixed_captions:  # what the cache made unnecessary leaves the GPU (the VAE:
        for encoder in base.text_encoders:  # `finish_latent_cache`)
            encoder.to("cpu")
    run.peak.mark("caching")  # the VAE and the text encoders' peak, before training
    preparing = time.perf_counter()
    params = list(trainable(base).values())
    groups = param_groups(base, recipe.text_encoder_lr, recipe.learning_rate,
                          block_lr(recipe.network, base.architecture))
    optimizer = make_optimizer(recipe.optimizer_settings, recipe.schedule, groups, device)
    lr_scheduler = make_lr_scheduler(recipe.optimizer_settings, recipe.schedule, optimizer, run.total)
    accelerator = make_accelerator(device, run.precision)
    # the denoiser is on the device already, but for the swapped blocks' weights, which must stay on the CPU
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler,
                                                        device_placement=[swap is None, True, True])
    if run.state is not None:
        optimizer.load_state_dict(run.state.optimizer)
        groups_to_device(optimizer, device)
        lr_scheduler.load_state_dict(run.state.lr_scheduler)
    run.times.add("optimizer", time.perf_counter() - preparing)
    parts = StepParts(unet, base.noise_scheduler, noise, accelerator, optimizer, params, flow,
                      text_encode=text.encode_ids if text.in_step else None,
                      optimizer_in_graph=recipe.optimizer in GRAPH_SAFE_OPTIMIZERS)
    ema = LoraEma(recipe.ema, trainable(base), state.ema if state else None) if recipe.use_ema else None
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
        ema=ema,
    )


def finish_latent_cache(run: TrainingRun, ctx: StepContext) -> None:
    """Wait for the latent cache (filled in the background on a GPU: LatentSource), time it, and move the VAE
    off the GPU where the cache made it unnecessary."""
    ctx.latents.finish()
    run.times.add("latent_caching", ctx.latents.waited_seconds)
    run.times.add("latent_caching_background", ctx.latents.busy_seconds)
    if run.device.type == "cuda" and run.recipe.cache_latents:
        run.base.vae.to("cpu")
