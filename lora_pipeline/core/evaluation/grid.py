"""Sample images for the X/Y grid (epochs × LoRA weights) and the labelled grid PNGs.

Images come from the stock diffusers pipeline with each epoch's kohya file loaded through
`load_lora_weights` and weighted with `set_adapters` — exactly how a user loads the LoRA — so the grid
shows what users will get. Every cell of one prompt starts from the same noise (a generator seeded from
`sample_seed + prompt index`), so only the epoch and the weight differ between cells.
"""

from __future__ import annotations

import io
import logging
import math
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import logging as diffusers_logging
from PIL import Image, ImageDraw, ImageFont

from lora_pipeline.core.evaluation.recommend import weight_label
from lora_pipeline.core.fileio import atomic_write_bytes
from lora_pipeline.core.models.loading import BaseModel
from lora_pipeline.core.training.network import for_diffusers
from lora_pipeline.core.training.recipe import Recipe

MIN_CELL = 128  # tiny samples are enlarged (nearest neighbour) to at least this, so labels stay legible
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
HIGHLIGHT = (220, 40, 40)
HIGHLIGHT_NOTE = "recommended"
PIPELINES: dict[str, type[DiffusionPipeline]] = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def sampling_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    """float32 on CPU; on an accelerator the recipe's mixed precision (fp16 / bf16), as training used."""
    if device.type == "cpu":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(recipe.mixed_precision, torch.float32)


def load_pipeline(base: BaseModel, dtype: torch.dtype, v_prediction: bool = False) -> DiffusionPipeline:
    """The stock text-to-image pipeline around the already loaded base model (its modules are shared, not copied).

    Only the sampling scheduler is read from the model folder (set to v-prediction for a recipe with
    `v_parameterization`); the safety checker is off, progress bars too. The VAE decodes in the sampling dtype
    (SDXL's pipeline upcasts an fp16 VAE itself where needed).
    """
    if base.vae.dtype != dtype:
        with quiet_diffusers():
            base.vae.to(dtype=dtype)
    parts: dict[str, object] = {"unet": base.unet, "vae": base.vae}
    for suffix, tokenizer, encoder in zip(("", "_2"), base.tokenizers, base.text_encoders, strict=False):
        parts[f"tokenizer{suffix}"], parts[f"text_encoder{suffix}"] = tokenizer, encoder
    if base.family == "sd15":
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = PIPELINES[base.family].from_pretrained(base.source, local_files_only=True, **parts)
    if v_prediction:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="v_prediction")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels on CPU, where that makes outputs byte-identical run to run; restored afterwards.

    On an accelerator the seeds are fixed all the same, but kernels keep their fast (not bitwise
    reproducible) choices: deterministic CUDA needs settings beyond this process's say (CUBLAS_WORKSPACE_CONFIG).
    """
    if device.type != "cpu":
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Hide diffusers' warnings that are expected here and would bury the run's own log lines.

    "No LoRA keys for the text encoder" (our LoRAs are U-Net only) and "cast with to()" (the SDXL pipeline
    itself moves an fp16 VAE to float32 and back on every call).
    """
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


@contextmanager
def loaded_lora(pipe: DiffusionPipeline, path: Path, epoch: int) -> Iterator[str]:
    """Load one epoch's kohya file as adapter `e<epoch>`; delete it again afterwards.

    Text-encoder keys go through network.for_diffusers (diffusers 0.42 misses kohya's `text_model` level in
    transformers 5's CLIP models)."""
    name = f"e{epoch}"
    encoders = [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e]
    tensors = for_diffusers(safetensors.torch.load_file(str(path)), encoders)
    with quiet_diffusers():
        pipe.load_lora_weights(tensors, adapter_name=name)
    try:
        yield name
    finally:
        pipe.delete_adapters([name])


@torch.no_grad()
def sample(pipe: DiffusionPipeline, recipe: Recipe, adapter: str | None = None, weight: float = 0.0) -> np.ndarray:
    """One image per sample prompt (one batched call) as uint8 [prompt, H, W, 3].

    `adapter` None samples the base model alone (the weight-0 column); otherwise the adapter is set to `weight`.
    """
    if adapter is not None:
        pipe.set_adapters([adapter], adapter_weights=[weight])
    prompts = list(recipe.sample_prompts)
    generators = [torch.Generator("cpu").manual_seed(recipe.sample_seed + i) for i in range(len(prompts))]
    with deterministic(pipe.device), quiet_diffusers():
        images = pipe(
            prompts, height=recipe.resolution, width=recipe.resolution, num_inference_steps=recipe.sample_steps,
            guidance_scale=recipe.guidance_scale, generator=generators, output_type="np",
        ).images
    return np.clip(np.rint(np.asarray(images, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def column_labels(weights: Sequence[float]) -> list[str]:
    return ["weight 0 (base)", *(weight_label(w) for w in weights)]


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    return math.ceil(draw.textlength(text, font=font))


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
          width: int) -> list[str]:
    """Greedy word wrap to `width` pixels (the prompt title of a wide or narrow grid)."""
    chars = max(8, len(text))
    while chars > 8 and any(_text_width(draw, line, font) > width for line in textwrap.wrap(text, chars)):
        chars -= 4
    return textwrap.wrap(text, chars) or [""]


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a grid: compose_grid draws with it, and tests slice cells back out with `cell_box`."""

    scale: int
    cell_w: int
    cell_h: int
    font_size: int
    gap: int
    pad: int
    line_h: int
    label_w: int
    title_lines: tuple[str, ...]
    top: int  # y of the header row
    width: int
    height: int

    @property
    def body_top(self) -> int:
        return self.top + self.line_h + self.pad

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        x = self.label_w + self.gap + col * (self.cell_w + self.gap)
        y = self.body_top + self.gap + row * (self.cell_h + self.gap)
        return x, y, x + self.cell_w, y + self.cell_h


def plan_grid(image_size: tuple[int, int], row_labels: Sequence[str], col_labels: Sequence[str], title: str,
              highlight_note: str = HIGHLIGHT_NOTE) -> GridLayout:
    """Lay out len(row_labels) x len(col_labels) cells of `image_size` (height, width) pixels each.

    Cells are enlarged by an integer factor (nearest neighbour, so pixels stay honest) to at least MIN_CELL;
    the font grows with the cell so labels stay readable at any resolution.
    """
    height, width = image_size
    scale = max(1, math.ceil(MIN_CELL / min(height, width)))
    cell_w, cell_h = width * scale, height * scale
    size = max(14, min(cell_h, cell_w) // 9)
    font = _font(size)
    gap, pad, line_h = max(4, size // 3), size // 2, size + size // 3
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = pad * 2 + max(_text_width(probe, t, font) for t in [*row_labels, highlight_note])
    grid_w = label_w + len(col_labels) * (cell_w + gap) + gap
    title_lines = tuple(_wrap(probe, title, font, grid_w - 2 * pad))
    top = pad + line_h * (len(title_lines) + 1) + pad  # title lines, then the subtitle line
    grid_h = top + line_h + pad + len(row_labels) * (cell_h + gap) + gap
    return GridLayout(scale, cell_w, cell_h, size, gap, pad, line_h, label_w, title_lines, top, grid_w, grid_h)


def compose_grid(
    cells: Sequence[Sequence[np.ndarray]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    subtitle: str,
    highlight_row: int | None = None,
) -> Image.Image:
    """Lay uint8 images out as a labelled X/Y grid: title, a header row of weights, an epoch label per row.

    `highlight_row` gets a coloured frame and HIGHLIGHT_NOTE under its label.
    """
    g = plan_grid(cells[0][0].shape[:2], row_labels, col_labels, title)
    font, small = _font(g.font_size), _font(max(12, g.font_size * 3 // 4))
    frame = g.gap - 1  # the highlight frame fills the gap around its row, never a neighbouring cell
    image = Image.new("RGB", (g.width, g.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(g.title_lines):
        draw.text((g.pad, g.pad + i * g.line_h), line, fill=INK, font=font)
    draw.text((g.pad, g.pad + len(g.title_lines) * g.line_h), subtitle, fill=INK, font=small)
    for c, label in enumerate(col_labels):
        x0, _, x1, _ = g.cell_box(0, c)
        draw.text(((x0 + x1 - _text_width(draw, label, font)) // 2, g.top), label, fill=INK, font=font)
    for r, (label, row) in enumerate(zip(row_labels, cells, strict=True)):
        _, y0, _, y1 = g.cell_box(r, 0)
        middle = (y0 + y1) // 2
        chosen = r == highlight_row
        draw.text((g.pad, middle - g.line_h), label, fill=HIGHLIGHT if chosen else INK, font=font)
        if chosen:
            draw.text((g.pad, middle), HIGHLIGHT_NOTE, fill=HIGHLIGHT, font=small)
            x0, x1 = g.cell_box(r, 0)[0], g.cell_box(r, len(row) - 1)[2]
            draw.rectangle((x0 - frame, y0 - frame, x1 + frame - 1, y1 + frame - 1), outline=HIGHLIGHT, width=frame)
        for c, pixels in enumerate(row):
            cell = Image.fromarray(pixels, "RGB")
            if g.scale > 1:
                cell = cell.resize((g.cell_w, g.cell_h), Image.Resampling.NEAREST)
            image.paste(cell, g.cell_box(r, c)[:2])
    return image


def save_png(image: Image.Image, path: Path) -> None:
    """PNG bytes depend on the pixels only (no timestamps or text chunks); written atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    atomic_write_bytes(path, buffer.getvalue())


def write_grids(
    out_dir: Path, recipe: Recipe, baseline: np.ndarray, by_epoch: dict[int, np.ndarray], recommended: int,
    subtitle: str,
) -> list[Path]:
    """One grid per sample prompt, `grid_<prompt index>.png`: rows are epochs, columns base + eval weights.

    `baseline` is uint8 [prompt, H, W, 3]; `by_epoch[e]` uint8 [weight, prompt, H, W, 3].
    """
    epochs = sorted(by_epoch)
    rows = [f"epoch {e}" for e in epochs]
    cols = column_labels(recipe.eval_weights)
    paths = []
    for index, prompt in enumerate(recipe.sample_prompts):
        cells = [[baseline[index], *by_epoch[e][:, index]] for e in epochs]
        path = out_dir / f"grid_{index}.png"
        save_png(compose_grid(cells, rows, cols, prompt, subtitle, epochs.index(recommended)), path)
        paths.append(path)
    return paths
