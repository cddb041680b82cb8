"""FLUX.1 for train_throughput.py (`--model flux1`): the diffusers-example reference step and the trainer's step.

- reference: as diffusers' examples/dreambooth/train_dreambooth_lora_flux.py steps: the VAE (latents shifted and
  scaled) and both text encoders (CLIP-L pooled, T5-XXL 512 tokens) every step, packed latents, flow-matching
  sigmas drawn as kohya's default (`timestep_sampling: sigma`, shift 3.0, no weighting: RectifiedFlow.draw), the
  transformer, CLIP and T5 frozen in bf16, bf16 autocast, torch AdamW on a peft LoRA (rank --rank) over the
  trainer's target modules (every Linear of the blocks, lora_layout.lora_targets), its weights in bf16 as the
  script leaves them under bf16 (it casts them to float32 only under fp16; until 2026-12-07 this reference cast them
  always, which made it pay peft's float32 copy of every LoRA input), clip 1.0, the loss read back;
- plain: the trainer's step (loop.update over StepParts.flow) on cached latents and text outputs, with the
  recipe's memory options through run/memory.py's `lighten_denoiser`: --fp8-base, --blocks-to-swap N,
  --gradient-checkpointing;
- fast: the same through the trainer's fast path (fastpath.GraphedSteps: the rectified-flow step replayed as one
  CUDA graph per shape; refused, with the reason printed, where a memory option blocks it: block swap, checkpointing);
- fast-compiled: fast with each double- and single-stream block compiled by torch.compile first (inductor, regional
  compilation: 2 distinct block graphs rather than one 57-block graph), then captured the same way.
Full size: FLUX.1 [dev]'s transformer (random weights, bf16), its VAE, CLIP-L and T5-XXL (core/models/fullsize.py),
1024 px, batch 1; --smoke: tiny-flux (core/models/tiny.py) at 64 px.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from torch.nn.attention import sdpa_kernel

from lora_pipeline.core.models import fullsize
from lora_pipeline.core.models.families import model_family
from lora_pipeline.core.models.lora_layout import lora_targets
from lora_pipeline.core.models.tiny import ensure_tiny_model
from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline.core.training.recipe_checks import fast_path_blockers
from lora_pipeline.core.training.recipe_groups import FlowSettings, NoiseSettings
from lora_pipeline.core.training.run.memory import lighten_denoiser
from lora_pipeline.core.training.seeds import Stream, torch_generator
from lora_pipeline.core.training.step.fastpath import GraphedSteps
from lora_pipeline.core.training.step.flux_step import RectifiedFlow, latent_image_ids, pack_latents, unpack_latents
from lora_pipeline.core.training.step.loop import (
    MAX_GRAD_NORM,
    TRAINING_ATTENTION,
    StepBatch,
    StepNoise,
    StepParts,
    make_accelerator,
    update,
)
from lora_pipeline.core.training.step.lora_fused import fuse_lora_linears
from lora_pipeline.core.training.step.norms import lora_inputs_uncast, norms_in_dtype
from lora_pipeline.core.training.step.optim import make_lr_scheduler, make_optimizer

FLUX1 = model_family("flux1")
T5_TOKENS = 512  # [dev]'s max_sequence_length, as the diffusers script and kohya use


def bench_recipe(args: argparse.Namespace) -> Recipe:
    """The trainer's recipe of the benchmark: the optimizer and memory options of the command line."""
    adaptive = args.optimizer in ("DAdaptAdamW", "Prodigy")
    return Recipe(name="bench", base_model="tiny-flux", model_family="flux1", optimizer=args.optimizer,
                  learning_rate=1.0 if adaptive else 1e-4, fp8_base=args.fp8_base,
                  blocks_to_swap=args.blocks_to_swap, gradient_checkpointing=args.gradient_checkpointing)


def fast_path_refusal(args: argparse.Namespace) -> str | None:
    """Why the trainer's fast path cannot run with these options (printed instead of a "fast" row); None: it can."""
    blockers = fast_path_blockers(bench_recipe(args))
    return blockers[0] if blockers else None


def compile_blocks(transformer: torch.nn.Module, backend: str) -> None:
    """Regional compilation: each double- and single-stream block compiled in place (the blocks of a kind share
    one graph, so the warm-up compiles two graphs, not 57 blocks' worth)."""
    for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
        block.compile(backend=backend, dynamic=False)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Random full-size weights drawn directly in `dtype` (FLUX's 12B parameters in float32 would take 48 GB)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def flux_parts(smoke: bool, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """transformer, vae, clip, t5 (all frozen, `dtype`) on `device`: full-size random or tiny-flux."""
    if smoke:
        from lora_pipeline.core.models.loading import load_base_model

        models = Path(tempfile.mkdtemp(prefix="flux-bench-"))
        ensure_tiny_model(models, "tiny-flux")
        base = load_base_model(models, "tiny-flux", "flux1", t5_max_length=T5_TOKENS)
        parts = {"transformer": base.denoiser, "vae": base.vae, "clip": base.text_encoders[0],
                 "t5": base.text_encoders[1]}
    else:
        with _default_dtype(dtype):
            # drawn on the device (seconds; minutes on the CPU), then kept on the CPU until the memory options
            # (fp8 storage, block swap) have placed it, as the trainer's loaded model is
            parts = {"transformer": fullsize.flux_transformer(device).to("cpu"), "vae": fullsize.vae("flux1", device),
                     "clip": fullsize.text_encoder("l", device), "t5": fullsize.t5_encoder(device)}
    for name, part in parts.items():
        part.requires_grad_(False).to(dtype)
        if name != "transformer":
            part.to(device)
    return parts


def _add_lora(transformer: torch.nn.Module, rank: int, float32: bool) -> list[torch.nn.Parameter]:
    """peft's LoRA over the trainer's targets; its weights in float32 where `float32` (the trainer's, always), else
    in the base's dtype (peft's default)."""
    torch.manual_seed(0)  # peft draws the gaussian init from the global generator: every variant starts alike
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=lora_targets(FLUX1, transformer)))
    if float32:
        cast_training_params(transformer, dtype=torch.float32)
    transformer.train()
    return [p for p in transformer.parameters() if p.requires_grad]


def _cached_batch(parts: dict[str, Any], batch: int, pixels: int, device: torch.device, dtype: torch.dtype
                  ) -> StepBatch:
    gen = torch_generator(0, Stream.LATENTS)
    channels = parts["transformer"].config.in_channels // 4
    latents = torch.randn(batch, channels, pixels // 8, pixels // 8, generator=gen).to(device)
    hidden = torch.randn(batch, T5_TOKENS, parts["t5"].config.d_model, generator=gen).to(device, dtype)
    pooled = torch.randn(batch, parts["clip"].config.hidden_size, generator=gen).to(device, dtype)
    return StepBatch(latents, hidden, text_embeds=pooled)


def end_script_step(accelerator: Any, loss: torch.Tensor, params: list[torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer, losses: list[float]) -> torch.Tensor:
    """How the diffusers training scripts end a step (the reference steps of SD and FLUX alike): log the loss
    (a host sync, as the scripts' progress bar does), backward, clip at kohya's default, step, zero."""
    losses.append(loss.detach().item())
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def reference_step(args: argparse.Namespace, device: torch.device, pixels: int, batch: int
                   ) -> Callable[[int], torch.Tensor]:
    """The diffusers-script step (module docstring)."""
    precision = "bf16" if device.type == "cuda" else "no"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    parts = flux_parts(args.smoke, dtype, device)
    transformer, vae, clip, t5 = (parts[k] for k in ("transformer", "vae", "clip", "t5"))
    transformer.to(device)
    # the script upcasts the LoRA to float32 only under fp16 (`if args.mixed_precision == "fp16":
    # cast_training_params(...)`): under bf16 its LoRA weights, and AdamW's state, stay bf16
    params = _add_lora(transformer, args.rank, float32=precision == "fp16")
    accelerator = make_accelerator(device, precision)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model, optimizer = accelerator.prepare(transformer, optimizer)
    flow = RectifiedFlow.of(FlowSettings(), transformer)
    gen = torch.Generator(device).manual_seed(0)
    pixel_values = torch.rand(batch, 3, pixels, pixels, generator=gen, device=device) * 2 - 1
    clip_ids = torch.randint(0, clip.config.vocab_size, (batch, 77), generator=gen, device=device)
    t5_ids = torch.randint(0, t5.config.vocab_size, (batch, T5_TOKENS), generator=gen, device=device)
    losses: list[float] = []

    def step(index: int) -> torch.Tensor:
        pooled = clip(clip_ids, output_hidden_states=False).pooler_output
        text = t5(t5_ids)[0]
        latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample()
        latents = ((latents - vae.config.shift_factor) * vae.config.scaling_factor).to(dtype)
        noise, sigmas = flow.draw(tuple(latents.shape), torch_generator(0, Stream.NOISE, index))
        noise, s = noise.to(device, dtype), sigmas.to(device, dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - s) * latents + s * noise
        h, w = latents.shape[-2:]
        guidance = torch.full((batch,), 1.0, device=device) if transformer.config.guidance_embeds else None
        # the trainer's attention kernels (loop.TRAINING_ATTENTION): the default choice on Hopper includes cuDNN's,
        # whose backward fails at FLUX's shapes (CUBLAS_STATUS_EXECUTION_FAILED in the next matmul, H200)
        with accelerator.autocast(), sdpa_kernel(TRAINING_ATTENTION):
            pred = model(hidden_states=pack_latents(noisy), timestep=s.view(-1), guidance=guidance,
                         pooled_projections=pooled, encoder_hidden_states=text,
                         txt_ids=torch.zeros(T5_TOKENS, 3, device=device, dtype=dtype),
                         img_ids=latent_image_ids(h, w, device, dtype), return_dict=False)[0]
            loss = F.mse_loss(unpack_latents(pred, h, w).float(), (noise - latents).float())
        with sdpa_kernel(TRAINING_ATTENTION):  # the backward too: same kernels as the forward
            return end_script_step(accelerator, loss, params, optimizer, losses)

    return step


def trainer_step(args: argparse.Namespace, device: torch.device, pixels: int, batch: int, variant: str = "plain"
                 ) -> tuple[Callable[[int], torch.Tensor], Callable[[], None], list[torch.nn.Parameter]]:
    """The trainer's step on cached inputs with the recipe's memory options, and the function that switches the
    variant's fast path on (and compiles the blocks first for fast-compiled) after the FLOP-counting eager step,
    which runs with the memory options already on."""
    precision = args.precision if device.type == "cuda" else "no"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[precision]
    parts = flux_parts(args.smoke, dtype, device)
    transformer = parts["transformer"]
    params = _add_lora(transformer, args.rank, float32=True)
    recipe = bench_recipe(args)
    swap = lighten_denoiser(transformer, FLUX1, recipe, device)
    if precision != "no":
        norms_in_dtype(transformer, dtype)
        lora_inputs_uncast(transformer)  # as the trainer does
    if not args.unfused_lora:
        fuse_lora_linears(transformer)
    for name in ("vae", "clip", "t5"):  # cached inputs: the frozen encoders leave the GPU, as in the trainer
        parts[name].to("cpu")
    optimizer = make_optimizer(recipe.optimizer_settings, recipe.schedule, params, device)
    lr_scheduler = make_lr_scheduler(recipe.optimizer_settings, recipe.schedule, optimizer,
                                     args.warmup + args.steps + 1)
    accelerator = make_accelerator(device, precision)
    model, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler,
                                                         device_placement=[swap is None, True, True])
    flow = RectifiedFlow.of(recipe.flow, transformer)
    step_parts = StepParts(model, None, NoiseSettings(), accelerator, optimizer, params, flow)
    cached = _cached_batch(parts, batch, pixels, device, dtype)
    updates: list[Callable[[StepBatch, StepNoise], torch.Tensor]] = [functools.partial(update, step_parts)]

    def step(index: int) -> torch.Tensor:
        loss = updates[-1](cached, step_parts.draw(cached.latents, torch_generator(0, Stream.NOISE, index)))
        lr_scheduler.step()
        return loss

    def prepare() -> None:
        if variant == "fast-compiled":
            compile_blocks(transformer, args.compile_backend)
        if variant in ("fast", "fast-compiled"):
            updates.append(GraphedSteps(step_parts, device))

    return step, prepare, params
