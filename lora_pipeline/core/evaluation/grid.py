"""The labelled X/Y grid PNGs (epochs × LoRA weights) of the images core/models/sampling.py renders."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lora_pipeline.core.evaluation.recommend import weight_label
from lora_pipeline.core.models.sampling import save_png
from lora_pipeline.core.training.recipe import Recipe

MIN_CELL = 128  # tiny samples are enlarged (nearest neighbour) to at least this, so labels stay legible
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
HIGHLIGHT = (220, 40, 40)
HIGHLIGHT_NOTE = "recommended"


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
