"""The steps that train_throughput.py times, on the shapes it times them at: the diffusers-example-style reference
step and the trainer's own step (plain, fast, fast-compiled), each on the same randomly initialised U-Net and LoRA;
the variants and shapes are described in train_throughput.py's docstring. Imported by train_throughput.py, which
puts benchmarks/ on the path for its sibling modules (flux_throughput, train_options).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import flux_throughput
import torch
import torch.nn.functional as F
import train_options
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_pipeline.core.models import fullsize
from lora_pipeline.core.training.kohya.lora_file import add_unet_lora
from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline.core.training.recipe_checks import GRAPH_SAFE_OPTIMIZERS
from lora_pipeline.core.training.run.memory import enable_checkpointing
from lora_pipeline.core.training.seeds import Stream, torch_generator
from lora_pipeline.core.training.step.fastpath import GraphedSteps
from lora_pipeline.core.training.step.loop import (
    StepBatch,
    StepNoise,
    StepParts,
    draw_noise,
    make_accelerator,
    update,
)
from lora_pipeline.core.training.step.lora_fused import fuse_lora_linears
from lora_pipeline.core.training.step.norms import lora_inputs_uncast, norms_in_dtype
from lora_pipeline.core.training.step.optim import make_lr_scheduler, make_optimizer

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    name: str
    unet: dict[str, Any]
    pixels: int
    batch: int
    text_dim: int
    pooled_dim: int | None = None  # SDXL's text_embeds
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latent(self) -> int:
        return self.pixels // 8


SD15 = Shape("sd15", fullsize.UNET_CONFIGS["sd15"], pixels=512, batch=8, text_dim=768)
SDXL = Shape("sdxl", fullsize.UNET_CONFIGS["sdxl"], pixels=1024, batch=4, text_dim=2048, pooled_dim=1280)
FLUX = Shape("flux1", {}, pixels=1024, batch=1, text_dim=4096, pooled_dim=768)
SMOKE = {
    "sd15": Shape("sd15", dict(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 32), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4,
    ), pixels=64, batch=2, text_dim=32),
    "sdxl": Shape("sdxl", dict(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
    ), pixels=64, batch=2, text_dim=64, pooled_dim=32),
    "flux1": Shape("flux1", {}, pixels=64, batch=1, text_dim=32, pooled_dim=32),
}


def build_unet(shape: Shape, device: torch.device, dtype: torch.dtype, rank: int, channels_last: bool = False
               ) -> UNet2DConditionModel:
    """A randomly initialised U-Net of the shape with a kohya-module LoRA, set up as the trainer does."""
    with torch.device(device):
        unet = UNet2DConditionModel(**shape.unet)
    unet.requires_grad_(False)
    if dtype != torch.float32:
        unet.to(dtype)
    add_unet_lora(unet, rank, rank / 2)
    cast_training_params(unet, dtype=torch.float32)
    unet.train()
    if device.type == "cuda" and channels_last:
        unet.to(memory_format=torch.channels_last)
    return unet


def _batch(shape: Shape, batch: int, device: torch.device, dtype: torch.dtype) -> StepBatch:
    gen = torch_generator(0, Stream.LATENTS)
    latents = torch.randn(batch, 4, shape.latent, shape.latent, generator=gen).to(device)
    hidden = torch.randn(batch, 77, shape.text_dim, generator=gen).to(device, dtype)
    if shape.pooled_dim is None:
        return StepBatch(latents, hidden)
    pooled = torch.randn(batch, shape.pooled_dim, generator=gen).to(device, dtype)
    ids = torch.tensor([[shape.pixels, shape.pixels, 0, 0, shape.pixels, shape.pixels]] * batch, dtype=dtype)
    return StepBatch(latents, hidden, text_embeds=pooled, time_ids=ids.to(device))



def _frozen_parts(shape: Shape, smoke: bool, device: torch.device) -> tuple[AutoencoderKL, list[CLIPTextModel]]:
    """The VAE and text encoder(s) of the shape: the real configurations, or tiny ones for --smoke."""
    if not smoke:
        parts = ["l"] if shape.pooled_dim is None else ["l", "g"]
        return fullsize.vae(shape.name, device), [fullsize.text_encoder(p, device) for p in parts]
    with torch.device(device):
        vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, latent_channels=4)
        widths = [shape.text_dim] if shape.pooled_dim is None else [shape.text_dim // 2, shape.text_dim // 2]
        encoders = [
            (CLIPTextModelWithProjection if i else CLIPTextModel)(CLIPTextConfig(
                hidden_size=w, intermediate_size=2 * w, num_hidden_layers=2, num_attention_heads=4,
                projection_dim=shape.pooled_dim or w, vocab_size=1000))
            for i, w in enumerate(widths)
        ]
    return vae, encoders


def reference_step(shape: Shape, args: argparse.Namespace, device: torch.device) -> Callable[[int], torch.Tensor]:
    """A diffusers-example-style step (see train_throughput.py's docstring) with the same U-Net, LoRA and batch."""
    precision = "fp16" if device.type == "cuda" else "no"
    dtype = DTYPES[precision]
    batch = args.batch or shape.batch
    unet = build_unet(shape, device, dtype, args.rank, args.channels_last)
    vae, encoders = _frozen_parts(shape, args.smoke, device)
    vae.requires_grad_(False)
    if shape.pooled_dim is None:  # the SDXL script keeps its VAE in float32
        vae.to(dtype)
    for encoder in encoders:
        encoder.requires_grad_(False).to(dtype)
    params = [p for p in unet.parameters() if p.requires_grad]
    accelerator = make_accelerator(device, precision)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model, optimizer = accelerator.prepare(unet, optimizer)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    gen = torch.Generator(device).manual_seed(0)
    pixels = torch.rand(batch, 3, shape.pixels, shape.pixels, generator=gen, device=device) * 2 - 1
    input_ids = torch.randint(0, encoders[0].config.vocab_size, (batch, 77), generator=gen, device=device)
    sizes = [shape.pixels, shape.pixels, 0, 0, shape.pixels, shape.pixels]
    losses: list[float] = []

    def step(index: int) -> torch.Tensor:
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (batch,), device=device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        added = None
        if shape.pooled_dim is None:
            hidden = encoders[0](input_ids, return_dict=False)[0]
        else:
            outs = [e(input_ids, output_hidden_states=True) for e in encoders]
            hidden = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
            time_ids = torch.tensor([sizes] * batch, device=device, dtype=dtype)  # built per batch, as the script
            added = {"text_embeds": outs[-1][0], "time_ids": time_ids}
        with accelerator.autocast():
            pred = model(noisy, timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        return flux_throughput.end_script_step(accelerator, loss, params, optimizer, losses)

    return step


def trainer_step(shape: Shape, args: argparse.Namespace, device: torch.device, variant: str
                 ) -> tuple[Callable[[int], torch.Tensor], Callable[[], None], list[torch.nn.Parameter]]:
    """The trainer's step on cached inputs (run_epoch's calls: draw_noise, the update, the schedule), and the
    function that switches the variant's fast path on after the FLOP-counting eager step."""
    precision = args.precision if device.type == "cuda" else "no"
    dtype = DTYPES[precision]
    unet = build_unet(shape, device, dtype, args.rank, args.channels_last)
    if precision != "no":  # as the trainer does
        lora_inputs_uncast(unet)
        if not args.autocast_norms:
            norms_in_dtype(unet, dtype)
    if not args.unfused_lora:
        fuse_lora_linears(unet)
    option = getattr(args, "option", None)  # --options (train_options.py)
    encoders, text_encode = train_options.trainer_pieces(shape, args, device, dtype, _frozen_parts)
    params = [p for p in unet.parameters() if p.requires_grad] + train_options.lora_params(encoders)
    adaptive = args.optimizer in ("DAdaptAdamW", "Prodigy")
    recipe = Recipe(name="bench", base_model="tiny-sd", optimizer=args.optimizer,
                    learning_rate=1.0 if adaptive else 1e-4)
    optimizer = make_optimizer(recipe.optimizer_settings, recipe.schedule, params, device)
    lr_scheduler = make_lr_scheduler(recipe.optimizer_settings, recipe.schedule, optimizer,
                                     args.warmup + args.steps + 1)
    accelerator = make_accelerator(device, precision)
    model, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    plain_batch = _batch(shape, args.batch or shape.batch, device, dtype)
    batch = train_options.option_batch(option, plain_batch, shape, encoders)
    parts = StepParts(model, scheduler, train_options.noise_settings(option), accelerator, optimizer, params,
                      text_encode=text_encode, optimizer_in_graph=args.optimizer in GRAPH_SAFE_OPTIMIZERS)
    updates: list[Callable[[StepBatch, StepNoise], torch.Tensor]] = [functools.partial(update, parts)]

    def step(index: int) -> torch.Tensor:
        generator = torch_generator(0, Stream.NOISE, index)
        drawn = draw_noise(plain_batch.latents, scheduler, generator, parts.settings)
        loss = updates[-1](batch, drawn)
        lr_scheduler.step()
        return loss

    step.updates = updates  # type: ignore[attr-defined]  # --options reports whether the fast variant captured

    def prepare() -> None:
        if args.gradient_checkpointing:
            enable_checkpointing(unet)  # as the trainer: the recomputation under the forward's attention kernels
        if variant == "fast-compiled":
            unet.compile(backend=args.compile_backend)
        if variant in ("fast", "fast-compiled"):
            updates.append(GraphedSteps(parts, device))

    return step, prepare, params
