"""LoRA training throughput and model-FLOP utilisation, measured through the trainer's own `training_step`.

    .venv/bin/python benchmarks/train_throughput.py [--model sd15|sdxl|both|flux1] [--steps 20] [--warmup 5]
        [--batch N] [--rank 32] [--variants reference,plain,fast] [--gradient-checkpointing]
        [--fp8-base] [--blocks-to-swap N] [--peak-tflops 989] [--options all|LIST] [--json] [--smoke]

FLUX.1 (`--model flux1`, 1024 px, batch 1; its reference step and options: benchmarks/flux_throughput.py).

Three variants, each timed in the same run so every figure has its ratio to the reference beside it:
- reference: a diffusers-example-style step (train_text_to_image_lora[_sdxl].py): VAE encode of the pixels,
  the text encoder(s) and the U-Net every step, frozen weights fp16 (the SDXL VAE fp32, as that script keeps
  it), fp16 autocast with a gradient scaler, torch AdamW, clip 1.0, and the loss read back every step
  (`train_loss += avg_loss.item()`);
- plain: the trainer's step on cached inputs, eager (what run_epoch calls: draw_noise, loop.update, the schedule);
- fast: the same through the trainer's fast path (fastpath.GraphedSteps: every step after the first two of a shape
  replayed as one CUDA graph);
- fast-compiled: fast with the U-Net compiled by torch.compile first (inductor), captured the same way; an
  experiment, not a trainer option.

Shapes (random weights built from the configs, nothing downloaded):
- sd15: SD 1.5's U-Net (320/640/1280/1280, cross-attention 768), 512 px = 64x64 latents, batch 8;
- sdxl: SDXL base's U-Net (320/640/1280, transformer depth 1/2/10, cross-attention 2048, text_time
  embeddings), 1024 px = 128x128 latents, batch 4.
Both train a rank-32 LoRA on kohya's module set with the frozen weights in bf16, LoRA weights in float32,
bf16 autocast through accelerate, SDPA attention, DAdaptAdamW (as the recipes), and cached inputs (random
latents and text embeddings of the right shapes), so the numbers are the U-Net's. Every variant keeps the
U-Net's weights in the default memory format, as the diffusers example and (since 2026-12-03) the trainer do;
`--channels-last` makes them channels-last in every variant (measured slower for the trainer's step).

FLOPs per step are counted by torch.utils.flop_counter.FlopCounterMode over one whole eager step (forward,
backward, optimizer) without gradient checkpointing: model FLOPs, so recomputation is not credited. MFU =
achieved FLOP/s / the dense bf16 peak given by --peak-tflops (default 989: H100 SXM; H200 is the same).
Timed steps run after the warm-up (which also absorbs compilation, reported as warmup_s), between
torch.cuda.synchronize calls.
--smoke runs tiny shapes for 2 steps on whatever device there is (CPU included), for tests.
--options times the trainer's step with each option of issue 22 (masks, class images, accumulation, checkpointing,
text-encoder LoRA, ip noise, Prodigy, AdamW8bit), plain and fast, beside the reference (benchmarks/train_options.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend
from torch.utils.flop_counter import FlopCounterMode

from lora_pipeline.core.training.recipe_fields import OPTIMIZERS
from lora_pipeline.core.training.step import loop

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by a test alike
import flux_throughput  # noqa: E402
import train_compare  # noqa: E402
import train_options  # noqa: E402
from train_steps import FLUX, SD15, SDXL, SMOKE, Shape, reference_step, trainer_step  # noqa: E402

H100_SXM_BF16_DENSE_TFLOPS = 989.0


def _addmm_in_place_flops(self_shape: Any, a_shape: Any, b_shape: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of `c.addmm_(a, b)` (torch's counter counts only the out-of-place addmm): the fused LoRA layers'
    base matmuls (core/training/step/lora_fused.py)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


IN_PLACE_FLOPS = {torch.ops.aten.addmm_: _addmm_in_place_flops}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(shape: Shape, variant: str, args: argparse.Namespace, device: torch.device
          ) -> tuple[dict[str, Any], Callable[[int], torch.Tensor]]:
    batch_size = args.batch or shape.batch
    flops = None
    flux = shape.name == "flux1"
    if variant == "reference":
        step = (functools.partial(flux_throughput.reference_step, pixels=shape.pixels, batch=batch_size) if flux
                else functools.partial(reference_step, shape))(args, device)
        precision = ("bf16" if flux else "fp16") if device.type == "cuda" else "no"
    else:
        step, prepare, _ = (flux_throughput.trainer_step(args, device, shape.pixels, batch_size, variant) if flux
                            else trainer_step(shape, args, device, variant))
        precision = args.precision if device.type == "cuda" else "no"
        with FlopCounterMode(display=False, custom_mapping=IN_PLACE_FLOPS) as counter:
            step(0)
        flops = counter.get_total_flops()
        prepare()
    _sync(device)
    if device.type == "cuda":  # the peak includes the warm-up: the fast path's graphs are made there
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for index in range(args.warmup):
        step(1 + index)
        _sync(device)
        print(f"[{shape.name} {variant}] warm-up step {index + 1}: {time.perf_counter() - started:.1f} s",
              file=sys.stderr, flush=True)
    warmup_s = time.perf_counter() - started
    if variant == "fast-compiled" and device.type == "cuda":
        print(torch._dynamo.utils.compile_times(), file=sys.stderr, flush=True)
    started = time.perf_counter()
    for index in range(args.steps):
        loss = step(1 + args.warmup + index)
    _sync(device)
    seconds = time.perf_counter() - started
    tflops = flops * args.steps / seconds / 1e12 if flops else None
    return {
        "model": shape.name, "variant": variant, "pixels": shape.pixels, "latent": shape.latent, "batch": batch_size,
        "rank": args.rank, "precision": precision,
        "gradient_checkpointing": args.gradient_checkpointing and variant != "reference",
        "fp8_base": args.fp8_base and variant != "reference",
        "blocks_to_swap": 0 if variant == "reference" else args.blocks_to_swap,
        "optimizer": "AdamW" if variant == "reference" else args.optimizer, "steps": args.steps,
        "images_per_second": batch_size * args.steps / seconds, "step_ms": 1000 * seconds / args.steps,
        "warmup_s": warmup_s, "flops_per_step": flops, "tflops_per_second": tflops,
        "mfu": tflops / args.peak_tflops if tflops else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "final_loss": float(loss),
    }, step


def _release(device: torch.device) -> None:
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "sdxl", "both", "flux1"), default="both")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: 8 for sd15, 4 for sdxl)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="DAdaptAdamW")
    parser.add_argument("--precision", choices=("bf16", "fp16", "no"), default="bf16", help="on CUDA; CPU runs fp32")
    parser.add_argument("--variants", default="reference,plain,fast",
                        help="comma-separated, from reference, plain, fast, fast-compiled (see above)")
    parser.add_argument("--compile-backend", default="inductor", help="for fast-compiled (tests: aot_eager)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="plain and fast variants")
    parser.add_argument("--fp8-base", action="store_true", help="flux1 plain: frozen Linears stored in float8")
    parser.add_argument("--blocks-to-swap", type=int, default=0, metavar="N",
                        help="flux1 plain: N transformer blocks' frozen weights on the CPU (kohya's split)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile N steps of the last variant and print its top kernels")
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS,
                        help="dense peak of the GPU at --precision, for MFU (default: H100 SXM bf16)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--compare", type=int, default=0, metavar="N",
                        help="instead of timing: N steps with the fast path off and on, and how their losses differ")
    parser.add_argument("--compare-runs", default="plain_again:plain,fast:fast",
                        help="--compare: the runs beside the first plain one, as name:variant pairs")
    parser.add_argument("--cudnn-attention", action="store_true",
                        help="let the trainer's step use cuDNN attention too (loop.TRAINING_ATTENTION leaves it out)")
    parser.add_argument("--channels-last", action="store_true",
                        help="every variant: the U-Net's weights channels-last (the trainer's until 2026-12-03)")
    parser.add_argument("--autocast-norms", action="store_true",
                        help="plain and fast variants: leave GroupNorm/LayerNorm to autocast's float32 (norms.py)")
    parser.add_argument("--unfused-lora", action="store_true",
                        help="plain and fast variants: peft's LoRA forward, not step/lora_fused.py's")
    parser.add_argument("--deterministic", action="store_true",
                        help="--compare: deterministic kernels (math attention, cuDNN and cuBLAS deterministic), so "
                             "two eager runs agree bit for bit and any fast-path difference is the capture's own")
    parser.add_argument("--options", type=train_options.parse_options, default=None, metavar="all|LIST",
                        help=f"each option ({', '.join(train_options.OPTIONS)}) plain and fast beside the reference "
                             "(benchmarks/train_options.py)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps, 1 warm-up (tests, CPU)")
    args = parser.parse_args(argv)
    args.variants = args.variants.split(",")
    args.compare_runs = [tuple(pair.split(":")) for pair in args.compare_runs.split(",")]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    if args.smoke:
        args.steps, args.warmup, args.rank = 2, 1, 4
    return args


def profile(step: Callable[[int], torch.Tensor], steps: int, device: torch.device) -> dict[str, Any]:
    """Kernel launches and device time per step, and the top kernels by device time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for index in range(steps):
            step(10_000 + index)
        _sync(device)
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    device_us = sum(e.self_device_time_total for e in kernels)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    return {
        "kernel_launches_per_step": launches / steps, "device_ms_per_step": device_us / 1000 / steps,
        "table": events.table(sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total",
                              row_limit=25, max_name_column_width=70),
    }


VARIANTS = ("reference", "plain", "fast", "fast-compiled")


def memory_options(result: dict[str, Any]) -> str:
    """", fp8 base, N blocks swapped" as far as the run used them."""
    return (", fp8 base" if result["fp8_base"] else "") + (
        f", {result['blocks_to_swap']} blocks swapped" if result["blocks_to_swap"] else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with train_options.cpu_threads(args.device):
        return _main(args, argv)


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.cudnn_attention:
        loop.TRAINING_ATTENTION.append(SDPBackend.CUDNN_ATTENTION)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any matmul
        loop.TRAINING_ATTENTION[:] = [SDPBackend.MATH]
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = ("sd15", "sdxl") if args.model == "both" else (args.model,)
    shapes = [SMOKE[n] if args.smoke else {"sd15": SD15, "sdxl": SDXL, "flux1": FLUX}[n] for n in names]
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
    if args.compare:
        with contextlib.redirect_stdout(sys.stderr):
            compared = [train_compare.compare(shape, args, device, trainer_step, _release) for shape in shapes]
        print(json.dumps({**header, "compare": compared}, indent=2))
        return 0
    if args.options:
        with contextlib.redirect_stdout(sys.stderr):
            rows = train_options.run_options(bench, shapes, args, device, _release)
        if args.json:
            print(json.dumps({**header, "results": rows}, indent=2))
        else:
            print(f"{header['device']} | torch {header['torch']} | {header['date']}\n$ {header['command']}")
            print(train_options.options_table(rows))
        return 1 if any("error" in r for r in rows) else 0
    results = []
    profiles = {}
    for shape in shapes:
        for variant in args.variants:
            refusal = flux_throughput.fast_path_refusal(args) if shape.name == "flux1" else None
            if variant.startswith("fast") and refusal:
                print(f"flux1 {variant}: not run: {refusal}", file=sys.stderr)
                continue
            try:
                with contextlib.redirect_stdout(sys.stderr):  # library chatter ("Using decoupled weight decay")
                    result, step = bench(shape, variant, args, device)
                    if args.profile and variant == args.variants[-1]:
                        profiles[shape.name] = profile(step, args.profile, device)
                results.append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)  # progress, in case a later variant stalls
                del step
            except torch.cuda.OutOfMemoryError:
                error = "out of GPU memory: try --gradient-checkpointing or a smaller --batch"
                results.append({"model": shape.name, "variant": variant, "error": error})
            _release(device)
    reference = {r["model"]: r["images_per_second"] for r in results if r.get("variant") == "reference"
                 and "error" not in r}
    for r in results:
        if "error" not in r and r["model"] in reference:
            r["vs_reference"] = r["images_per_second"] / reference[r["model"]]
    if args.json:
        print(json.dumps({**header, "results": results,
                          "profiles": {k: {n: v for n, v in p.items() if n != "table"} for k, p in profiles.items()}},
                         indent=2))
        return 1 if any("error" in r for r in results) else 0
    print(f"{header['device']} | torch {header['torch']} | {header['date']}\n$ {header['command']}")
    print(f"MFU against {args.peak_tflops:g} TFLOP/s ({header['peak_source']})")
    for r in results:
        if "error" in r:
            print(f"{r['model']} {r['variant']}: {r['error']}")
            continue
        memory = f" | peak memory {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else ""
        ratio = f" ({r['vs_reference']:.2f}x reference)" if "vs_reference" in r else ""
        flops = (f" | {r['flops_per_step'] / 1e12:.4g} TFLOP/step | {r['tflops_per_second']:.4g} TFLOP/s | "
                 f"MFU {100 * r['mfu']:.3g}%" if r["flops_per_step"] else "")
        print(
            f"{r['model']} {r['variant']}: {r['pixels']} px (latents {r['latent']}x{r['latent']}), batch {r['batch']}, "
            f"rank {r['rank']}, {r['precision']}, gradient checkpointing "
            f"{'on' if r['gradient_checkpointing'] else 'off'}, {r['optimizer']}{memory_options(r)}\n"
            f"  {r['images_per_second']:.2f} images/s{ratio} | {r['step_ms']:.1f} ms/step | warm-up "
            f"{r['warmup_s']:.1f} s{flops}{memory}"
        )
    for name, p in profiles.items():
        print(f"profile {name} {args.variants[-1]}: {p['kernel_launches_per_step']:.0f} kernel launches/step, "
              f"{p['device_ms_per_step']:.1f} ms device time/step\n{p['table']}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
