"""One training step (shared with benchmarks/train_throughput.py) and one epoch of steps.

The step follows kohya's train_network: DDPM noise on the latents at uniform timesteps (within min/max_timestep)
with kohya's noise options (noise.py: offset, multi-resolution and input-perturbation noise), kohya's loss_type
(loss.py: MSE, L1, Huber) against epsilon (or v for v-prediction), the loss mask (`apply_masked_loss`) and per-image
weights (`prior_loss_weight` on class images), min-SNR-gamma weighting (`apply_snr_weight`) or the debiased
estimation loss, gradient-norm clipping at kohya's default 1.0. With gradient accumulation a step is several micro-
batches of one bucket whose noise is drawn as for one batch of all their images, each loss weighted by its share of
those images: the step equals one batch of train_batch_size x gradient_accumulation_steps images (up to float
summation order). FLUX.1 trains the rectified-flow objective instead (flux_step.py, `StepParts.flow`); everything
around the objective (captions, views, masks, per-image weights, accumulation, DDP shares) is the same.

In several processes (DDP, distributed.py) every process prepares each step as one process would (same images,
captions, views, noise and timesteps) and trains on its contiguous share of the step's images (`Shard`), its
micro-batches cut where one process cuts them. Each image's loss is weighted so that DDP's average of the
processes' gradients is the gradient of the whole step's loss, and the processes' losses are summed into it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import AutocastKwargs
from diffusers import DDPMScheduler
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.optim.lr_scheduler import LRScheduler

from lora_pipeline.core.models.loading import host_to_device
from lora_pipeline.core.training.inputs.augment import View, step_views
from lora_pipeline.core.training.inputs.caption_shuffle import step_captions
from lora_pipeline.core.training.inputs.data import TrainImage
from lora_pipeline.core.training.inputs.encode import LatentSource, TextSource, time_ids
from lora_pipeline.core.training.kohya.dropout import reseed_dropout
from lora_pipeline.core.training.optimizer_args import MAX_GRAD_NORM
from lora_pipeline.core.training.progress import Progress
from lora_pipeline.core.training.recipe_groups import AugmentationSettings, NoiseSettings
from lora_pipeline.core.training.seeds import Stream, torch_generator
from lora_pipeline.core.training.step.denoising import (
    StepBatch,
    StepNoise,
    denoising_loss,
    draw_flow_noise,
    draw_noise,
    flow_batch_loss,
)
from lora_pipeline.core.training.step.ema import LoraEma
from lora_pipeline.core.training.step.flux_step import RectifiedFlow
from lora_pipeline.core.training.step.optim import effective_lrs, step_lr

# Attention kernels the step may use: not cuDNN's, whose backward returns NaN for some shapes on Hopper GPUs
# (pytorch/pytorch#196678, NVIDIA/cudnn-frontend#160); flash attention is as fast at the U-Net's shapes.
TRAINING_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state (device, precision, distributed setup), so that the next
    Accelerator is set up anew: a new run may use another precision than the previous one. accelerate offers
    this only as a private method (its own tests use it); this is the one place the project calls it."""
    AcceleratorState._reset_state(reset_partial_state=True)


def make_accelerator(device: torch.device, precision: str) -> Accelerator:
    """An Accelerator for one device: `precision` ("no" | "fp16" | "bf16") autocasts the prepared U-Net."""
    reset_accelerate_state()
    # No autocast weight cache: PyTorch requires it off when a step is captured as a CUDA graph (fastpath.py),
    # and each LoRA weight is cast once per forward anyway.
    return Accelerator(cpu=device.type == "cpu", mixed_precision=precision,
                       kwargs_handlers=[AutocastKwargs(cache_enabled=False)])


@dataclass
class StepParts:
    """What a step updates besides the batch: the (prepared) U-Net, its noise schedule and the optimizer; with
    `text_encode` (token ids of each encoder -> hidden states and pooled embeddings, in the step's dtype) the text
    encoders, run inside the step: frozen ones where the captions change every step, or ones carrying a training
    LoRA."""

    unet: torch.nn.Module
    scheduler: DDPMScheduler
    settings: NoiseSettings
    accelerator: Accelerator
    optimizer: torch.optim.Optimizer
    params: Sequence[torch.nn.Parameter]
    flow: RectifiedFlow | None = None  # FLUX.1's objective; None: the DDPM one of `scheduler` and `settings`
    text_encode: Callable[[list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor | None]] | None = None
    # False: the optimizer cannot be captured (AdamW8bit, adamw8bit.py); the fast path replays `gradients` and
    # runs `optimizer_step` after each replay
    optimizer_in_graph: bool = True

    def draw(self, latents: torch.Tensor, generator: torch.Generator, images: int | None = None) -> StepNoise:
        """The step's noise for `images` images of the latents' shape (default: as many as `latents` has); for the
        flow objective `timesteps` holds the sigmas."""
        if self.flow is None:
            return draw_noise(latents, self.scheduler, generator, self.settings, images)
        return draw_flow_noise(self.flow, latents, generator, images)

    def loss(self, batch: StepBatch, drawn: StepNoise) -> torch.Tensor:
        """The objective's loss of one batch (`denoising_loss` for DDPM)."""
        if self.flow is None:
            return denoising_loss(self.unet, self.scheduler, batch, drawn, self.settings)
        return flow_batch_loss(self.unet, self.flow, batch, drawn)

    def conditioned(self, batch: StepBatch) -> StepBatch:
        """The batch with its text conditioning: given, or encoded from its token ids (outside autocast, as the
        text encoders ran before they moved into the step; gradients flow where they train), with the step's
        attention kernels."""
        ids = batch.token_ids()
        if not ids:
            return batch
        if self.text_encode is None:
            raise ValueError("a batch of token ids needs StepParts.text_encode")
        with sdpa_kernel(TRAINING_ATTENTION):
            hidden, pooled = self.text_encode(ids)
        return replace(batch, encoder_hidden_states=hidden, text_embeds=pooled)


def update(parts: StepParts, batch: StepBatch | Sequence[StepBatch], drawn: StepNoise) -> torch.Tensor:
    """Forward, backward, clip and optimizer step; the learning-rate schedule is the caller's. Device work only:
    the fast path captures exactly this as a CUDA graph (fastpath.py). `batch` may be the micro-batches of an
    accumulated step, `drawn` then the noise of all their images (see the module docstring)."""
    loss = gradients(parts, batch, drawn)
    optimizer_step(parts)
    return loss


def optimizer_step(parts: StepParts) -> None:
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)


def gradients(parts: StepParts, batch: StepBatch | Sequence[StepBatch], drawn: StepNoise) -> torch.Tensor:
    """Forward, backward and clip of `update`: the gradients are in the parameters' `.grad`; the detached loss."""
    if isinstance(batch, StepBatch):
        batch = parts.conditioned(batch)
        with parts.accelerator.autocast(), sdpa_kernel(TRAINING_ATTENTION):
            loss = parts.loss(batch, drawn)
        with sdpa_kernel(TRAINING_ATTENTION):  # a checkpointed block recomputes its attention with the same kernel
            parts.accelerator.backward(loss)
    else:
        loss = _accumulate(parts, batch, drawn)
    parts.accelerator.clip_grad_norm_(parts.params, MAX_GRAD_NORM)
    return loss.detach()


def _accumulate(parts: StepParts, micro: Sequence[StepBatch], drawn: StepNoise) -> torch.Tensor:
    """Backward of each micro-batch, each loss weighted by its share of the step's images; the step's loss.
    Under DDP only the last backward all-reduces the gradients (processes may hold different numbers of
    micro-batches, and each must join the same all-reduces)."""
    sizes = [m.latents.shape[0] for m in micro]
    total, start, losses = sum(sizes), 0, []
    for n, (part, size) in enumerate(zip(micro, sizes, strict=True)):
        last = n == len(micro) - 1
        with contextlib.nullcontext() if last else parts.accelerator.no_sync(parts.unet):
            part = parts.conditioned(part)
            with parts.accelerator.autocast(), sdpa_kernel(TRAINING_ATTENTION):
                loss = parts.loss(part, drawn.part(start, size))
                loss = loss * (size / total)
            with sdpa_kernel(TRAINING_ATTENTION):
                parts.accelerator.backward(loss)
        losses.append(loss.detach())
        start += size
    return torch.stack(losses).sum()


def training_step(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    batch: StepBatch,
    generator: torch.Generator,
    settings: NoiseSettings,
    *,
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: LRScheduler,
    params: Sequence[torch.nn.Parameter],
) -> torch.Tensor:
    """Forward, backward, clip, optimizer and schedule step; returns the detached loss (no device sync)."""
    parts = StepParts(unet, scheduler, settings, accelerator, optimizer, params)
    loss = update(parts, batch, draw_noise(batch.latents, scheduler, generator, settings))
    lr_scheduler.step()
    return loss


@dataclass(frozen=True)
class Shard:
    """This process's part of every step when training runs in `world` processes (DDP)."""

    rank: int
    world: int

    def rows(self, size: int) -> tuple[int, int, float]:
        """(start, end, weight): this process's contiguous rows of a step of `size` images (shares differ by at most
        one) and the weight of their losses, world x share / size, so that DDP's average of the processes'
        gradients is the gradient of the step's mean loss. A process left without rows (a step smaller than the
        world) takes row 0 at weight 0: every process must join each gradient all-reduce."""
        start, end = self.rank * size // self.world, (self.rank + 1) * size // self.world
        if start == end:
            return 0, 1, 0.0
        return start, end, self.world * (end - start) / size


def require_agreement(accelerator: Accelerator, **values: int) -> None:
    """Raise unless every process of the run has the same `values` (where to start, how many steps): a process
    that disagreed would wait forever for gradient all-reduces the others never start."""
    mine = torch.tensor([list(values.values())], device=accelerator.device)
    every = accelerator.gather(mine)
    if not bool((every == mine).all()):
        raise RuntimeError(f"the training processes disagree on {', '.join(values)}: {every.tolist()}")


@dataclass
class StepContext:
    """Everything an epoch needs besides its number; built once per run by the trainer."""

    parts: StepParts
    # `update` of the parts: eager, or the fast path's replayed graphs (fastpath.GraphedSteps)
    update: Callable[[StepBatch | Sequence[StepBatch], StepNoise], torch.Tensor]
    lr_scheduler: LRScheduler
    images: Sequence[TrainImage]
    latents: LatentSource
    text: TextSource
    seed: int
    augmentation: AugmentationSettings  # the recipe's, flip_aug also on when the dataset spec sets it
    micro_conditioning: bool  # the family's added time ids (SDXL)
    dtype: torch.dtype  # of the text conditioning and time ids
    progress: Progress | None = None  # in-epoch progress lines (progress.py)
    warmup_steps_per_shape: int = 1  # steps at a new batch shape that are slower (fast path: eager + capture)
    masked_loss: bool = False
    prior_loss_weight: float | None = None  # None: no regularisation images in the run
    micro_batch: int = 0  # gradient accumulation: micro-batches of this many images per step (0: none)
    shard: Shard | None = None  # this process's rows of each step when training runs in several processes
    ema: LoraEma | None = None  # use_ema: the shadow updated after every optimizer step (ema.py)
    shapes_seen: dict[tuple[int, ...], int] = field(default_factory=dict)


@dataclass
class EpochStats:
    losses: list[float]
    lrs: list[float]
    images: int
    seconds: float
    # Wall time of the warm-up steps at each new batch shape (with the fast path: the eager step and the capture), and
    # the end of the run's first step (perf_counter), both measured with a device sync around those steps only.
    warmup_seconds: float = 0.0
    first_step_done: float | None = None

    @classmethod
    def merged(cls, parts: Sequence[EpochStats]) -> EpochStats:
        """One epoch's stats from those of its consecutive chunks (save_every_n_steps cuts an epoch)."""
        return cls(
            losses=[x for p in parts for x in p.losses], lrs=[x for p in parts for x in p.lrs],
            images=sum(p.images for p in parts), seconds=sum(p.seconds for p in parts),
            warmup_seconds=sum(p.warmup_seconds for p in parts),
            first_step_done=next((p.first_step_done for p in parts if p.first_step_done is not None), None),
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_batch(ctx: StepContext, step: int, indices: list[int], captions: list[str], views: list[View],
                cut: tuple[int, int], rows: tuple[int, int], weight: float) -> StepBatch:
    """Images [a, b) = `rows` of a step (its `indices`, `captions` and `views`), part of its micro-batch
    [start, stop) = `cut` (whose latents are drawn as one batch without a cache), each image's loss weighted by
    `weight` (Shard.rows) and its prior_loss_weight."""
    (start, stop), (a, b) = cut, rows
    picked = [ctx.images[i] for i in indices[a:b]]
    device = ctx.parts.accelerator.device
    text = ctx.text.batch(captions[a:b])  # token ids where the text encoders train (encoded in the step)
    ids = [*(text.ids or []), None, None]
    weights, mask = None, None
    if ctx.prior_loss_weight is not None or ctx.shard is not None:
        prior = ctx.prior_loss_weight
        weights = torch.tensor([weight * (prior if prior is not None and image.is_reg else 1.0) for image in picked])
        weights = host_to_device(weights, device)  # a plain .to() would wait for the GPU (and cannot be captured)
    if ctx.masked_loss:
        mask = torch.stack([image.mask_pixels(view) for image, view in zip(picked, views[a:b], strict=True)])
        mask = host_to_device(mask, device)
    return StepBatch(
        latents=ctx.latents.batch(indices[start:stop], step, views[start:stop], slice(a - start, b - start)),
        encoder_hidden_states=text.hidden,
        text_embeds=text.pooled,
        time_ids=time_ids(picked, ctx.dtype, device, views[a:b]) if ctx.micro_conditioning else None,
        mask=mask,
        loss_weights=weights,
        input_ids=ids[0],
        input_ids_2=ids[1],
    )


def step_inputs(ctx: StepContext, epoch: int, step: int, indices: list[int]
                ) -> tuple[StepBatch | list[StepBatch], StepNoise]:
    """The batch (with accumulation: this process's micro-batches) and the drawn noise of global step `step`,
    which trains the images `indices` in `epoch`."""
    augment = ctx.augmentation
    picked = [ctx.images[i] for i in indices]
    captions = step_captions(
        [image.caption for image in picked], augment.caption_separator, augment.keep_tokens,
        augment.shuffle_caption, ctx.seed, epoch, step, augment.caption_dropout,
    )
    views = step_views(picked, augment.flip_aug, augment.random_crop, ctx.seed, step)
    size = len(indices)
    first, end, weight = ctx.shard.rows(size) if ctx.shard else (0, size, 1.0)
    cuts = [(0, size)]
    if ctx.micro_batch:
        cuts = [(k, min(size, k + ctx.micro_batch)) for k in range(0, size, ctx.micro_batch)]
    micro = [  # this process's part of each micro-batch
        _step_batch(ctx, step, indices, captions, views, (start, stop), (max(start, first), min(stop, end)), weight)
        for start, stop in cuts if max(start, first) < min(stop, end)
    ]
    generator = torch_generator(ctx.seed, Stream.NOISE, step)
    reseed_dropout(ctx.parts.unet, ctx.seed, step)  # kohya's LoRA dropouts, when the recipe sets them
    drawn = ctx.parts.draw(micro[0].latents, generator, size)
    drawn = drawn.part(first, end - first)  # drawn for the whole step: an image gets the same draws in any process
    return (micro if ctx.micro_batch else micro[0]), drawn


def run_epoch(ctx: StepContext, epoch: int, batches: list[list[int]], first_step: int) -> EpochStats:
    """Train one epoch; global steps are numbered from `first_step` (1-based).

    Losses and learning rates stay on the device until the epoch ends (one sync), so the host queues steps
    ahead of the GPU; only the warm-up steps at a new batch shape are synchronised, to time them.
    """
    losses: list[torch.Tensor] = []
    lrs: list[tuple[float, torch.Tensor | float]] = []
    images = 0
    parts = ctx.parts
    device = parts.accelerator.device
    warmup, first_done = 0.0, None
    started = time.perf_counter()
    for offset, indices in enumerate(batches):
        step = first_step + offset
        batch, drawn = step_inputs(ctx, epoch, step, indices)
        size = len(indices)
        shape = tuple((batch[0] if isinstance(batch, list) else batch).latents.shape)
        seen = ctx.shapes_seen.get(shape, 0)
        warming = seen < ctx.warmup_steps_per_shape
        if warming:
            _sync(device)
            step_started = time.perf_counter()
        losses.append(ctx.update(batch, drawn))
        if ctx.ema is not None:
            ctx.ema.update(step)
        ctx.lr_scheduler.step()
        lrs.append(step_lr(parts.optimizer))
        ctx.shapes_seen[shape] = seen + 1
        if warming:
            _sync(device)
            warmup += time.perf_counter() - step_started
        if first_done is None:
            first_done = time.perf_counter()
        images += size
        if ctx.progress is not None:
            ctx.progress.step(step)
    stacked = torch.stack(losses).float() if losses else None
    if stacked is not None and ctx.shard is not None:  # each process's weighted share: summed, the step's loss
        stacked = parts.accelerator.reduce(stacked, reduction="sum") / ctx.shard.world
    values = stacked.cpu().tolist() if stacked is not None else []
    return EpochStats(losses=values, lrs=effective_lrs(lrs), images=images, seconds=time.perf_counter() - started,
                      warmup_seconds=warmup, first_step_done=first_done)
