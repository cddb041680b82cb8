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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import AutocastKwargs
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.optim.lr_scheduler import LRScheduler

from lora_pipeline.core.models.loading import host_to_device
from lora_pipeline.core.training.inputs.augment import View, step_views
from lora_pipeline.core.training.inputs.caption_shuffle import step_captions
from lora_pipeline.core.training.inputs.data import TrainImage
from lora_pipeline.core.training.inputs.encode import LatentSource, TextSource, time_ids
from lora_pipeline.core.training.progress import Progress
from lora_pipeline.core.training.recipe_groups import AugmentationSettings, NoiseSettings
from lora_pipeline.core.training.seeds import Stream, torch_generator
from lora_pipeline.core.training.step.flux_step import RectifiedFlow
from lora_pipeline.core.training.step.loss import conditional_loss, huber_threshold
from lora_pipeline.core.training.step.noise import debiased_weight
from lora_pipeline.core.training.step.noise import draw_noise as draw_host_noise
from lora_pipeline.core.training.step.optim import effective_lrs, step_lr

MAX_GRAD_NORM = 1.0  # kohya's --max_grad_norm default
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
class StepBatch:
    latents: torch.Tensor  # scaled latents (b, c, h, w)
    encoder_hidden_states: torch.Tensor
    text_embeds: torch.Tensor | None = None  # SDXL pooled text embeddings
    time_ids: torch.Tensor | None = None  # SDXL micro-conditioning
    mask: torch.Tensor | None = None  # (b, 1, H, W) loss masks in [0, 1] at pixel resolution (masked_loss)
    loss_weights: torch.Tensor | None = None  # (b,) per-image weights (prior_loss_weight on class images)


def apply_snr_weight(
    loss: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler, gamma: float, v_prediction: bool
) -> torch.Tensor:
    """kohya's min-SNR weighting: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction."""
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return loss * (clipped / (snr + 1 if v_prediction else snr)).to(loss.device)


@dataclass
class StepNoise:
    """The random inputs of one step, on the latents' device: noise (latents' dtype) and timesteps;
    `perturbation` (ip_noise_gamma) is added to the noise of the noised latents only, the target keeps `noise`."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    perturbation: torch.Tensor | None = None

    def part(self, start: int, size: int) -> StepNoise:
        """The noise of images [start, start + size) (a micro-batch of an accumulated step)."""
        end = start + size
        extra = None if self.perturbation is None else self.perturbation[start:end]
        return StepNoise(self.noise[start:end], self.timesteps[start:end], extra)


def draw_noise(
    latents: torch.Tensor, scheduler: DDPMScheduler, generator: torch.Generator, settings: NoiseSettings,
    images: int | None = None,
) -> StepNoise:
    """Noise and timesteps drawn from `generator` (CPU, so a run is reproducible on any device; noise.draw_noise),
    then moved: for `images` images of the latents' shape (default: as many as `latents` has)."""
    shape = (latents.shape[0] if images is None else images, *latents.shape[1:])
    host = draw_host_noise(shape, scheduler.config.num_train_timesteps, generator, settings)
    device, dtype = latents.device, latents.dtype
    extra = None if host.perturbation is None else host_to_device(host.perturbation, device).to(dtype)
    return StepNoise(host_to_device(host.noise, device).to(dtype), host_to_device(host.timesteps, device), extra)


def denoising_loss(
    unet: torch.nn.Module, scheduler: DDPMScheduler, batch: StepBatch, drawn: StepNoise, settings: NoiseSettings
) -> torch.Tensor:
    """The loss of one batch from its drawn noise: device work only (no host sync), so it can be graph-captured."""
    latents, noise, timesteps = batch.latents, drawn.noise, drawn.timesteps
    noised = noise if drawn.perturbation is None else noise + drawn.perturbation
    noisy = scheduler.add_noise(latents, noised, timesteps)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    added = None
    if batch.text_embeds is not None:
        added = {"text_embeds": batch.text_embeds, "time_ids": batch.time_ids}
    pred = unet(noisy, timesteps, batch.encoder_hidden_states, added_cond_kwargs=added).sample
    huber_c = huber_threshold(settings, timesteps, scheduler.config.num_train_timesteps, scheduler.alphas_cumprod)
    loss = conditional_loss(pred.float(), target.float(), settings.loss_type, huber_c)
    if batch.mask is not None:  # kohya's apply_masked_loss: the mask area-averaged to the latent size
        loss = loss * F.interpolate(batch.mask.to(loss.device, loss.dtype), size=loss.shape[2:], mode="area")
    loss = loss.mean(dim=[1, 2, 3])
    if batch.loss_weights is not None:
        loss = loss * batch.loss_weights.to(loss.device)
    if settings.min_snr_gamma:
        loss = apply_snr_weight(loss, timesteps, scheduler, settings.min_snr_gamma, v_prediction)
    if settings.debiased_estimation_loss:
        loss = debiased_weight(loss, timesteps, scheduler)
    return loss.mean()


def draw_flow_noise(flow: RectifiedFlow, latents: torch.Tensor, generator: torch.Generator,
                    images: int | None = None) -> StepNoise:
    """The flow objective's noise and sigmas (in `timesteps`) for `images` images of the latents' shape (default: as
    many as `latents` has), drawn from `generator` (CPU) then moved."""
    noise, sigmas = flow.draw((latents.shape[0] if images is None else images, *latents.shape[1:]), generator)
    return StepNoise(host_to_device(noise, latents.device).to(latents.dtype), host_to_device(sigmas, latents.device))


def flow_batch_loss(transformer: torch.nn.Module, flow: RectifiedFlow, batch: StepBatch, drawn: StepNoise
                    ) -> torch.Tensor:
    """The flow objective's loss of one batch from its drawn noise and sigmas."""
    return flow.loss(transformer, batch.latents, drawn.noise, drawn.timesteps, batch.encoder_hidden_states,
                     batch.text_embeds, batch.mask, batch.loss_weights)


def compute_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    batch: StepBatch,
    generator: torch.Generator,
    settings: NoiseSettings,
    flow: RectifiedFlow | None = None,
) -> torch.Tensor:
    """The loss of one batch, DDPM's or (with `flow`) the rectified flow's; all randomness drawn from `generator`
    (CPU) then moved."""
    if flow is not None:
        return flow_batch_loss(unet, flow, batch, draw_flow_noise(flow, batch.latents, generator))
    return denoising_loss(unet, scheduler, batch, draw_noise(batch.latents, scheduler, generator, settings), settings)


@dataclass
class StepParts:
    """What a step updates besides the batch: the (prepared) U-Net, its noise schedule and the optimizer."""

    unet: torch.nn.Module
    scheduler: DDPMScheduler
    settings: NoiseSettings
    accelerator: Accelerator
    optimizer: torch.optim.Optimizer
    params: Sequence[torch.nn.Parameter]
    flow: RectifiedFlow | None = None  # FLUX.1's objective; None: the DDPM one of `scheduler` and `settings`

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


def update(parts: StepParts, batch: StepBatch | Sequence[StepBatch], drawn: StepNoise) -> torch.Tensor:
    """Forward, backward, clip and optimizer step; the learning-rate schedule is the caller's. Device work only:
    the fast path captures exactly this as a CUDA graph (fastpath.py). `batch` may be the micro-batches of an
    accumulated step, `drawn` then the noise of all their images (see the module docstring)."""
    if isinstance(batch, StepBatch):
        with parts.accelerator.autocast(), sdpa_kernel(TRAINING_ATTENTION):
            loss = parts.loss(batch, drawn)
        with sdpa_kernel(TRAINING_ATTENTION):  # a checkpointed block recomputes its attention with the same kernel
            parts.accelerator.backward(loss)
    else:
        loss = _accumulate(parts, batch, drawn)
    parts.accelerator.clip_grad_norm_(parts.params, MAX_GRAD_NORM)
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
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
    text = ctx.text.batch(captions[a:b])
    weights = None
    if ctx.prior_loss_weight is not None or ctx.shard is not None:
        prior = ctx.prior_loss_weight
        weights = torch.tensor([weight * (prior if prior is not None and image.is_reg else 1.0) for image in picked])
    return StepBatch(
        latents=ctx.latents.batch(indices[start:stop], step, views[start:stop], slice(a - start, b - start)),
        encoder_hidden_states=text.hidden,
        text_embeds=text.pooled,
        time_ids=(time_ids(picked, ctx.dtype, ctx.parts.accelerator.device, views[a:b]) if ctx.micro_conditioning
                  else None),
        mask=torch.stack([image.mask_pixels(view) for image, view in zip(picked, views[a:b], strict=True)])
        if ctx.masked_loss else None,
        loss_weights=weights,
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
