"""LoRA training throughput and model-FLOP utilisation, measured through the trainer's own `training_step`.

    .venv/bin/python benchmarks/train_throughput.py [--model sd15|sdxl|both] [--steps 20] [--warmup 5]
        [--batch N] [--rank 32] [--compile] [--gradient-checkpointing] [--peak-tflops 989] [--json] [--smoke]

Shapes (random weights built from the configs, nothing downloaded):
- sd15: SD 1.5's U-Net (320/640/1280/1280, cross-attention 768), 512 px = 64x64 latents, batch 8;
- sdxl: SDXL base's U-Net (320/640/1280, transformer depth 1/2/10, cross-attention 2048, text_time
  embeddings), 1024 px = 128x128 latents, batch 4.
Both train a rank-32 LoRA on kohya's module set with the frozen weights in bf16, LoRA weights in float32,
bf16 autocast through accelerate, channels-last, SDPA attention, DAdaptAdamW (as the recipes), and
cached inputs (random latents and text embeddings of the right shapes), so the numbers are the U-Net's.

FLOPs per step are counted by torch.utils.flop_counter.FlopCounterMode over one whole eager step (forward,
backward, optimizer) without gradient checkpointing: model FLOPs, so recomputation is not credited. MFU =
achieved FLOP/s / the dense bf16 peak given by --peak-tflops (default 989: H100 SXM; H200 is the same).
Timed steps run after the warm-up (which also absorbs torch.compile), between torch.cuda.synchronize calls.
--smoke runs tiny shapes for 2 steps on whatever device there is (CPU included), for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from torch.utils.flop_counter import FlopCounterMode

from lora_pipeline.core.training.loop import NoiseSettings, StepBatch, make_accelerator, training_step
from lora_pipeline.core.training.lora_file import add_unet_lora
from lora_pipeline.core.training.optim import make_lr_scheduler, make_optimizer
from lora_pipeline.core.training.recipe import OPTIMIZERS, Recipe
from lora_pipeline.core.training.seeds import Stream, torch_generator

H100_SXM_BF16_DENSE_TFLOPS = 989.0
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


SD15 = Shape("sd15", dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
), pixels=512, batch=8, text_dim=768)
SDXL = Shape("sdxl", dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
), pixels=1024, batch=4, text_dim=2048, pooled_dim=1280)
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
}


def build_unet(shape: Shape, device: torch.device, dtype: torch.dtype, rank: int) -> UNet2DConditionModel:
    """A randomly initialised U-Net of the shape with a kohya-module LoRA, set up as the trainer does."""
    with torch.device(device):
        unet = UNet2DConditionModel(**shape.unet)
    unet.requires_grad_(False)
    if dtype != torch.float32:
        unet.to(dtype)
    add_unet_lora(unet, rank, rank / 2)
    cast_training_params(unet, dtype=torch.float32)
    unet.train()
    if device.type == "cuda":
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(shape: Shape, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    precision = args.precision if device.type == "cuda" else "no"
    dtype = DTYPES[precision]
    batch_size = args.batch or shape.batch
    unet = build_unet(shape, device, dtype, args.rank)
    params = [p for p in unet.parameters() if p.requires_grad]
    adaptive = args.optimizer in ("DAdaptAdamW", "Prodigy")
    recipe = Recipe(name="bench", base_model="tiny-sd", optimizer=args.optimizer,
                    learning_rate=1.0 if adaptive else 1e-4)
    optimizer = make_optimizer(recipe, params, device)
    lr_scheduler = make_lr_scheduler(recipe, optimizer, args.warmup + args.steps + 1)
    accelerator = make_accelerator(device, precision)
    model, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    batch = _batch(shape, batch_size, device, dtype)

    def step(index: int) -> torch.Tensor:
        return training_step(model, scheduler, batch, torch_generator(0, Stream.NOISE, index), NoiseSettings(),
                             accelerator=accelerator, optimizer=optimizer, lr_scheduler=lr_scheduler, params=params)

    with FlopCounterMode(display=False) as counter:
        step(0)
    flops = counter.get_total_flops()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.compile:
        model.compile()
    for index in range(args.warmup):
        step(1 + index)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for index in range(args.steps):
        loss = step(1 + args.warmup + index)
    _sync(device)
    seconds = time.perf_counter() - started
    tflops = flops * args.steps / seconds / 1e12
    return {
        "model": shape.name, "pixels": shape.pixels, "latent": shape.latent, "batch": batch_size, "rank": args.rank,
        "precision": precision, "compile": args.compile, "gradient_checkpointing": args.gradient_checkpointing,
        "optimizer": args.optimizer, "lora_params": sum(p.numel() for p in params), "steps": args.steps,
        "images_per_second": batch_size * args.steps / seconds, "step_ms": 1000 * seconds / args.steps,
        "flops_per_step": flops, "tflops_per_second": tflops, "mfu": tflops / args.peak_tflops,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "final_loss": float(loss),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "sdxl", "both"), default="both")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (torch.compile happens here)")
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: 8 for sd15, 4 for sdxl)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="DAdaptAdamW")
    parser.add_argument("--precision", choices=("bf16", "fp16", "no"), default="bf16", help="on CUDA; CPU runs fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS,
                        help="dense peak of the GPU at --precision, for MFU (default: H100 SXM bf16)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps, 1 warm-up (tests, CPU)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.rank = 2, 1, 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = ("sd15", "sdxl") if args.model == "both" else (args.model,)
    shapes = [SMOKE[n] if args.smoke else {"sd15": SD15, "sdxl": SDXL}[n] for n in names]
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({torch.get_num_threads()} threads)"
    command = [sys.executable, *sys.argv] if argv is None else ["benchmarks/train_throughput.py", *argv]
    default_peak = args.peak_tflops == H100_SXM_BF16_DENSE_TFLOPS
    header = {
        "device": device_name, "torch": torch.__version__, "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(command), "peak_tflops": args.peak_tflops,
        "peak_source": "default: H100 SXM dense bf16" if default_peak else "--peak-tflops",
    }
    results = []
    for shape in shapes:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # library chatter ("Using decoupled weight decay")
                results.append(bench(shape, args, device))
        except torch.cuda.OutOfMemoryError:
            error = "out of GPU memory: try --gradient-checkpointing or a smaller --batch"
            results.append({"model": shape.name, "error": error})
            torch.cuda.empty_cache()
    if args.json:
        print(json.dumps({**header, "results": results}, indent=2))
    else:
        print(f"{header['device']} | torch {header['torch']} | {header['date']}\n$ {header['command']}")
        print(f"MFU against {args.peak_tflops:g} TFLOP/s ({header['peak_source']})")
        for r in results:
            if "error" in r:
                print(f"{r['model']}: {r['error']}")
                continue
            memory = f" | peak memory {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else ""
            print(
                f"{r['model']}: {r['pixels']} px (latents {r['latent']}x{r['latent']}), batch {r['batch']}, "
                f"rank {r['rank']}, {r['precision']}, compile {'on' if r['compile'] else 'off'}, gradient "
                f"checkpointing {'on' if r['gradient_checkpointing'] else 'off'}, {r['optimizer']}\n"
                f"  {r['images_per_second']:.2f} images/s | {r['step_ms']:.1f} ms/step | "
                f"{r['flops_per_step'] / 1e12:.4g} TFLOP/step | {r['tflops_per_second']:.4g} TFLOP/s | "
                f"MFU {100 * r['mfu']:.3g}%{memory}"
            )
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
