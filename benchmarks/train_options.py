"""`train_throughput.py --options`: the trainer's step with each option that used to leave the fast path (issue 22),
plain and fast, beside the reference step of the same run, and whether the fast one ran captured.

    .venv/bin/python benchmarks/train_throughput.py --model sd15 --options all [--steps 20] [--warmup 5]
    .venv/bin/python benchmarks/train_throughput.py --smoke --model both --options all --device cpu   # seconds

Each option changes one thing against the default trainer step of train_throughput.py (DAdaptAdamW, cached inputs,
batch 8 at SD1.5 / 4 at SDXL), as a recipe would:
- masks: a (b, 1, H, W) loss mask at pixel size (masked_loss);
- reg: per-image loss weights, half the batch class images at prior_loss_weight 0.5;
- accumulation: the batch as 2 micro-batches of half its size (gradient_accumulation_steps 2; the same images per
  optimizer step, so images/s compare directly);
- checkpointing: gradient checkpointing (run/memory.py's `enable_checkpointing`);
- te-lora: a rank-`--rank` LoRA on the text encoder(s) too (the full-size CLIP-L, and SDXL's CLIP-bigG), trained
  inside the step from random token ids (network_train_unet_only: false; one learning rate);
- ip-noise: ip_noise_gamma 0.1;
- prodigy, adamw8bit: the optimizer (learning rate 1.0 for Prodigy, 1e-4 for AdamW8bit).
"captured" says what the fast variant replayed: the whole step, the step without the optimizer (AdamW8bit: its
step runs after each replay), or nothing (the eager step). On a CPU (--smoke) "captured" means the fast path's
bookkeeping ran (the recorded step is called again; there is no graph).
"""

from __future__ import annotations

import argparse
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from diffusers.training_utils import cast_training_params

from lora_pipeline.core.models.families import model_family
from lora_pipeline.core.training.inputs.encode import TextSource
from lora_pipeline.core.training.kohya.network import add_text_encoder_lora
from lora_pipeline.core.training.progress import training_threads
from lora_pipeline.core.training.recipe_groups import NoiseSettings
from lora_pipeline.core.training.seeds import Stream, torch_generator
from lora_pipeline.core.training.step.denoising import StepBatch
from lora_pipeline.core.training.step.fastpath import GraphedSteps

OPTIONS = ("masks", "reg", "accumulation", "checkpointing", "te-lora", "ip-noise", "prodigy", "adamw8bit")
OPTIMIZER_OPTIONS = {"prodigy": "Prodigy", "adamw8bit": "AdamW8bit"}


@contextmanager
def cpu_threads(device: str | None) -> Iterator[None]:
    """On a CPU, as many torch threads as the cores others leave idle (the trainer's `training_threads`): on a busy
    machine two spinning threads made a --smoke step 20x slower than one. Restored after."""
    threads = torch.get_num_threads()
    cpu = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cpu"
    wanted = training_threads() if cpu else None
    if wanted is not None:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def parse_options(value: str) -> list[str]:
    """--options: "all" or a comma-separated subset of OPTIONS."""
    chosen = list(OPTIONS) if value == "all" else [v for v in value.split(",") if v]
    unknown = set(chosen) - set(OPTIONS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown options: {', '.join(sorted(unknown))} (from {', '.join(OPTIONS)})")
    return chosen


def option_args(args: argparse.Namespace, option: str | None) -> argparse.Namespace:
    """The run's arguments as the option sets them (its optimizer, checkpointing)."""
    changed = argparse.Namespace(**vars(args))
    changed.option = option
    if option in OPTIMIZER_OPTIONS:
        changed.optimizer = OPTIMIZER_OPTIONS[option]
    if option == "checkpointing":
        changed.gradient_checkpointing = True
    return changed


def noise_settings(option: str | None) -> NoiseSettings:
    return NoiseSettings(ip_noise_gamma=0.1) if option == "ip-noise" else NoiseSettings()


def text_encoders(shape: Any, smoke: bool, device: torch.device, dtype: torch.dtype, rank: int, frozen: Callable
                  ) -> tuple[list[torch.nn.Module], Callable[[list[torch.Tensor]], tuple]]:
    """te-lora: the shape's text encoder(s) (frozen weights in `dtype`) with kohya's LoRA (float32), and the
    trainer's in-step encoding of token ids (TextSource.encode_ids)."""
    _, encoders = frozen(shape, smoke, device)
    for encoder in encoders:
        encoder.requires_grad_(False).to(dtype)
        add_text_encoder_lora(encoder, rank, rank / 2)
        cast_training_params(encoder, dtype=torch.float32)
    family = types.SimpleNamespace(text_encoders=encoders, architecture=model_family(shape.name))
    return encoders, TextSource(family, dtype, device, train=True).encode_ids  # type: ignore[arg-type]


def option_batch(option: str | None, batch: StepBatch, shape: Any, encoders: list[torch.nn.Module]
                 ) -> StepBatch | list[StepBatch]:
    """The step's input with the option's extra tensors (made once, as cached inputs are)."""
    size, device = batch.latents.shape[0], batch.latents.device
    generator = torch_generator(0, Stream.LATENTS, 1)
    if option == "masks":
        mask = torch.rand(size, 1, shape.pixels, shape.pixels, generator=generator)
        return replace(batch, mask=mask.to(device))
    if option == "reg":
        weights = torch.tensor([1.0] * (size - size // 2) + [0.5] * (size // 2))
        return replace(batch, loss_weights=weights.to(device))
    if option == "te-lora":
        ids = [torch.randint(0, e.config.vocab_size, (size, 77), generator=generator).to(device) for e in encoders]
        return replace(batch, encoder_hidden_states=None, text_embeds=None, input_ids=ids[0],
                       input_ids_2=ids[1] if len(ids) > 1 else None)
    if option == "accumulation":
        half = max(1, size // 2)

        def rows(start: int, stop: int) -> StepBatch:
            return StepBatch(*(None if t is None else t[start:stop] for t in vars(batch).values()))

        return [rows(0, half), rows(half, size)]
    return batch


def captured(update: Callable) -> str:
    """What the fast variant replayed (see the module docstring)."""
    if not isinstance(update, GraphedSteps) or not update.captured:
        return "no (eager)"
    return "yes" if update.parts.optimizer_in_graph else "forward/backward (optimizer after the replay)"


def run_options(bench: Callable, shapes: list[Any], args: argparse.Namespace, device: torch.device,
                release: Callable[[torch.device], None]) -> list[dict[str, Any]]:
    """The reference once per shape (if in --variants) and each option's plain and fast steps (those of --variants)."""
    results = []
    for shape in shapes:
        if "reference" in args.variants:
            result, _ = bench(shape, "reference", option_args(args, None), device)
            results.append({**result, "option": None})
            release(device)
        for option in args.options:
            for variant in [v for v in args.variants if v in ("plain", "fast")]:
                torch.manual_seed(0)  # the same random weights and LoRA init for the plain and the fast step
                try:
                    result, step = bench(shape, variant, option_args(args, option), device)
                    results.append({**result, "option": option, "captured": captured(step.updates[-1])})
                    del step
                except torch.cuda.OutOfMemoryError:
                    results.append({"model": shape.name, "variant": variant, "option": option,
                                    "error": "out of GPU memory"})
                except RuntimeError as error:  # a capture that fails: the row says so, the other options still run
                    results.append({"model": shape.name, "variant": variant, "option": option,
                                    "error": f"failed: {str(error).splitlines()[0][:120]}"})
                    print(f"[{shape.name} {variant} {option}] {traceback.format_exc()}", file=sys.stderr, flush=True)
                release(device)
    return results


def options_table(results: list[dict[str, Any]]) -> str:
    """One line per option and model: plain and fast images/s, each with its ratio to the same run's reference."""
    reference = {r["model"]: r["images_per_second"] for r in results if r.get("variant") == "reference"}
    lines = ["| model | option | plain images/s | fast images/s | fast captured | reference images/s |",
             "|---|---|---|---|---|---|"]
    rows: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in results:
        if r.get("option"):
            rows.setdefault((r["model"], r["option"]), {})[r["variant"]] = r
    for (model, option), by_variant in rows.items():
        ref = reference.get(model)

        def cell(variant: str, row: dict[str, dict[str, Any]] = by_variant, ref: float | None = ref) -> str:
            r = row.get(variant)
            if r is None:
                return "-"
            if "error" in r:
                return r["error"]
            ratio = f" ({r['images_per_second'] / ref:.2f}x)" if ref else ""
            return f"{r['images_per_second']:.2f}{ratio}"

        fast = by_variant.get("fast", {})
        lines.append(f"| {model} | {option} | {cell('plain')} | {cell('fast')} | {fast.get('captured', '-')} | "
                     f"{f'{ref:.2f}' if ref else '-'} |")
    return "\n".join(lines)


def trainer_pieces(shape: Any, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                   frozen: Callable) -> tuple[list[torch.nn.Module], Callable | None]:
    """The text encoders and their in-step encoding where the option trains them (te-lora), else none."""
    if getattr(args, "option", None) != "te-lora":
        return [], None
    return text_encoders(shape, args.smoke, device, dtype, args.rank, frozen)


def lora_params(encoders: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [p for e in encoders for p in e.parameters() if p.requires_grad]

