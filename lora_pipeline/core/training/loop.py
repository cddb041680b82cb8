"""One training step (shared with benchmarks/train_throughput.py) and one epoch of steps.

The step follows kohya's train_network: DDPM noise on the latents at uniform timesteps, kohya's noise
offset (`noise += offset * randn(b, c, 1, 1)`), MSE against epsilon (or v for v-prediction models),
min-SNR-gamma weighting (`apply_snr_weight`), gradient-norm clipping at kohya's default 1.0.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from torch.optim.lr_scheduler import LRScheduler

from lora_pipeline.core.models.loading import host_to_device
from lora_pipeline.core.training.augment import step_views
from lora_pipeline.core.training.caption_shuffle import CaptionDropout, step_captions
from lora_pipeline.core.training.data import TrainImage
from lora_pipeline.core.training.encode import LatentSource, TextSource, time_ids
from lora_pipeline.core.training.optim import effective_lrs, step_lr
from lora_pipeline.core.training.seeds import Stream, torch_generator

MAX_GRAD_NORM = 1.0  # kohya's --max_grad_norm default


def make_accelerator(device: torch.device, precision: str) -> Accelerator:
    """An Accelerator for one device: `precision` ("no" | "fp16" | "bf16") autocasts the prepared U-Net."""
    # accelerate keeps one process-wide state; a new run may use another precision than the previous one.
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=precision)


@dataclass
class StepBatch:
    latents: torch.Tensor  # scaled latents (b, c, h, w)
    encoder_hidden_states: torch.Tensor
    text_embeds: torch.Tensor | None = None  # SDXL pooled text embeddings
    time_ids: torch.Tensor | None = None  # SDXL micro-conditioning


@dataclass(frozen=True)
class NoiseSettings:
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None


def apply_snr_weight(
    loss: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler, gamma: float, v_prediction: bool
) -> torch.Tensor:
    """kohya's min-SNR weighting: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction."""
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return loss * (clipped / (snr + 1 if v_prediction else snr)).to(loss.device)


def compute_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    batch: StepBatch,
    generator: torch.Generator,
    settings: NoiseSettings,
) -> torch.Tensor:
    """The denoising loss of one batch; all randomness drawn from `generator` (CPU) then moved."""
    latents = batch.latents
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator)
    if settings.noise_offset:
        noise = noise + settings.noise_offset * torch.randn((b, c, 1, 1), generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    noise = host_to_device(noise, latents.device).to(latents.dtype)
    timesteps = host_to_device(timesteps, latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    added = None
    if batch.text_embeds is not None:
        added = {"text_embeds": batch.text_embeds, "time_ids": batch.time_ids}
    pred = unet(noisy, timesteps, batch.encoder_hidden_states, added_cond_kwargs=added).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    if settings.min_snr_gamma:
        loss = apply_snr_weight(loss, timesteps, scheduler, settings.min_snr_gamma, v_prediction)
    return loss.mean()


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
    with accelerator.autocast():
        loss = compute_loss(unet, scheduler, batch, generator, settings)
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@dataclass
class StepContext:
    """Everything an epoch needs besides its number; built once per run by the trainer."""

    unet: torch.nn.Module
    scheduler: DDPMScheduler
    accelerator: Accelerator
    optimizer: torch.optim.Optimizer
    lr_scheduler: LRScheduler
    params: list[torch.nn.Parameter]
    images: Sequence[TrainImage]
    latents: LatentSource
    text: TextSource
    settings: NoiseSettings
    seed: int
    separator: str
    keep_tokens: int
    shuffle_caption: bool
    sdxl: bool
    dtype: torch.dtype  # of the text conditioning and time ids
    fast_path: bool = False  # the U-Net's blocks are compiled (fastpath.py)
    caption_dropout: CaptionDropout = CaptionDropout()
    flip_aug: bool = False
    random_crop: bool = False
    shapes_seen: set[tuple[int, ...]] = field(default_factory=set)


@dataclass
class EpochStats:
    losses: list[float]
    lrs: list[float]
    images: int
    seconds: float
    # Wall time of the steps that met a new batch shape (compiling for it, when the fast path is on), and
    # the end of the run's first step (perf_counter), both measured with a device sync around those steps only.
    warmup_seconds: float = 0.0
    first_step_done: float | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_epoch(ctx: StepContext, epoch: int, batches: list[list[int]], first_step: int) -> EpochStats:
    """Train one epoch; global steps are numbered from `first_step` (1-based).

    Losses and learning rates stay on the device until the epoch ends (one sync), so the host queues steps
    ahead of the GPU; only the first step at a new batch shape is synchronised, to time its warm-up.
    """
    losses: list[torch.Tensor] = []
    lrs: list[tuple[float, torch.Tensor | float]] = []
    images = 0
    device = ctx.accelerator.device
    warmup, first_done = 0.0, None
    started = time.perf_counter()
    for offset, indices in enumerate(batches):
        step = first_step + offset
        picked = [ctx.images[i] for i in indices]
        captions = step_captions(
            [image.caption for image in picked], ctx.separator, ctx.keep_tokens, ctx.shuffle_caption, ctx.seed,
            epoch, step, ctx.caption_dropout,
        )
        text = ctx.text.batch(captions)
        views = step_views(picked, ctx.flip_aug, ctx.random_crop, ctx.seed, step)
        batch = StepBatch(
            latents=ctx.latents.batch(indices, step, views),
            encoder_hidden_states=text.hidden,
            text_embeds=text.pooled,
            time_ids=time_ids(picked, ctx.dtype, device, views) if ctx.sdxl else None,
        )
        shape = tuple(batch.latents.shape)
        new_shape = shape not in ctx.shapes_seen
        if new_shape:
            _sync(device)
            step_started = time.perf_counter()
        losses.append(
            training_step(
                ctx.unet, ctx.scheduler, batch, torch_generator(ctx.seed, Stream.NOISE, step), ctx.settings,
                accelerator=ctx.accelerator, optimizer=ctx.optimizer, lr_scheduler=ctx.lr_scheduler,
                params=ctx.params,
            )
        )
        lrs.append(step_lr(ctx.optimizer))
        if new_shape:
            _sync(device)
            ctx.shapes_seen.add(shape)
            warmup += time.perf_counter() - step_started
        if first_done is None:
            first_done = time.perf_counter()
        images += len(indices)
    values = torch.stack(losses).float().cpu().tolist() if losses else []
    return EpochStats(losses=values, lrs=effective_lrs(lrs), images=images, seconds=time.perf_counter() - started,
                      warmup_seconds=warmup, first_step_done=first_done)
