"""contact_sheet.png: every image as training sees it, with its file name, caption and problems.

A person scans it for the visual/caption fit that no check can judge. Problem images are outlined
(red = error, orange = warning) with their problem codes; a loss mask's edge is drawn in light blue;
undecodable files get a placeholder cell.
Beyond `max_images`, images with problems are shown first and the rest is counted as "+N more".
The output depends only on the inputs (no timestamps), so the same snapshot gives the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from PIL import Image, ImageDraw, ImageFilter, ImageFont

from lora_pipeline.core.datasets.checks.validation import ValidationResult, source_label
from lora_pipeline.core.datasets.images import THUMBNAIL, thumbnail
from lora_pipeline.core.datasets.masks import ALPHA, load_mask
from lora_pipeline.core.datasets.problems import Problem
from lora_pipeline.core.datasets.snapshot.manifest import read_manifest
from lora_pipeline.core.datasets.sources.rights import UNKNOWN
from lora_pipeline.core.fileio import atomic_write_bytes

CELL = THUMBNAIL  # thumbnail box, px
PAD = 8
COLUMNS = 8
MIN_COLUMNS = 4  # keeps the header legible for tiny datasets
FONT_SIZE = 11
LINE = 14
TITLE_SIZE = 14
TITLE_LINE = 18
NAME_LINES, CAPTION_LINES, CODE_LINES = 1, 4, 2
COL_W = CELL + 2 * PAD
ROW_H = PAD + CELL + PAD + (NAME_LINES + CAPTION_LINES + CODE_LINES) * LINE + PAD
HEADER_H = 2 * TITLE_LINE + 2 * PAD
FOOTER_H = TITLE_LINE + 2 * PAD
MAX_IMAGES = 200
PNG_LEVEL = 1
DECODE_THREADS = 2
COLOURS = {"error": (214, 39, 40), "warning": (245, 140, 0)}
MASK_COLOUR = (0, 190, 255)  # the outline of an image's loss mask
RIGHTS_COLOUR = (150, 0, 170)  # the badge of an image whose batch has unknown rights
RIGHTS_BADGE = "rights?"
TEXT, MUTED, BOX = (20, 20, 20), (120, 120, 120), (236, 236, 236)


@dataclass(frozen=True)
class SheetItem:
    path: str  # snapshot-relative image path
    file: Path | None  # None draws the "cannot decode" placeholder
    caption: str
    problems: tuple[Problem, ...]
    size: tuple[int, int] | None = None  # as training sees it (after EXIF orientation)
    thumbnail: Image.Image | None = None  # from the validation decode; else `file` is decoded again
    mask: Path | None = None  # the loss mask's file (the image itself for an alpha mask)
    mask_alpha: bool = False
    rights: str | None = None  # "unknown" draws the `rights?` badge


@dataclass(frozen=True)
class ContactSheet:
    path: Path
    shown: int
    total: int


def sheet_size(shown: int, truncated: bool) -> tuple[int, int]:
    """Pixel size of a sheet with `shown` cells (and a "+N more" footer when `truncated`)."""
    columns = max(MIN_COLUMNS, min(COLUMNS, shown))
    rows = -(-shown // columns)
    return columns * COL_W, HEADER_H + rows * ROW_H + (FOOTER_H if truncated else 0)


def problems_by_image(snapshot_dir: Path, result: ValidationResult) -> dict[str, list[Problem]]:
    """Problems attached to each image: found on the image or its caption, in the snapshot or its source.

    Matching is by path without extension, so an image and its `.txt` caption share their problems.
    """
    owners: dict[tuple[str, str], str] = {}
    for row in read_manifest(snapshot_dir):
        if row.kind != "image":
            continue
        owners[(result.scope, str(PurePosixPath(row.path).with_suffix("")))] = row.path
        if row.source_path is not None:
            owners[(source_label(row), str(PurePosixPath(row.source_path).with_suffix("")))] = row.path
    attached: dict[str, list[Problem]] = {}
    for p in result.problems:
        if not p["file"]:  # about the whole set, not one file
            continue
        owner = owners.get((p["scope"], str(PurePosixPath(p["file"]).with_suffix(""))))
        if owner:
            attached.setdefault(owner, []).append(p)
    return attached


def select_items(
    snapshot_dir: Path, result: ValidationResult, captions: Mapping[str, str], max_images: int
) -> list[SheetItem]:
    """Up to `max_images` items in path order; images with problems are chosen first. Their thumbnails come
    from the validation decode; the few it did not keep (images flagged only by a later check) are decoded
    again here, on threads (Pillow decodes without holding the GIL)."""
    attached = problems_by_image(snapshot_dir, result)
    paths = sorted(result.infos)
    chosen = set(([p for p in paths if p in attached] + [p for p in paths if p not in attached])[:max_images])
    items = [
        SheetItem(
            path=p,
            file=snapshot_dir / p if result.infos[p].decoded else None,
            caption=captions.get(p, ""),
            problems=tuple(attached.get(p, ())),
            size=(info.width, info.height) if (info := result.infos[p]).width and info.height else None,
            thumbnail=result.thumbnails.get(p) if info.decoded else None,
            mask=snapshot_dir / (p if result.masks[p] == ALPHA else result.masks[p]) if p in result.masks else None,
            mask_alpha=result.masks.get(p) == ALPHA,
            rights=result.rights.get(p),
        )
        for p in paths
        if p in chosen
    ]
    missing = [i for i, item in enumerate(items) if item.file is not None and item.thumbnail is None]
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        for i, thumb in zip(missing, pool.map(lambda i: thumbnail(items[i].file), missing), strict=True):
            items[i] = replace(items[i], thumbnail=thumb)
    return items


def wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` px; over-long words are split; the last kept line ends in '...'."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while font.getlength(current) > width:
            cut = 1
            while cut < len(current) and font.getlength(current[: cut + 1]) <= width:
                cut += 1
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def render(items: Sequence[SheetItem], title: str, total: int) -> Image.Image:
    font = ImageFont.load_default(size=FONT_SIZE)
    title_font = ImageFont.load_default(size=TITLE_SIZE)
    truncated = total > len(items)
    width, height = sheet_size(len(items), truncated)
    columns = width // COL_W
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    text_w = width - 2 * PAD
    for n, line in enumerate(wrap(title, title_font, text_w, 2)):
        draw.text((PAD, PAD + n * TITLE_LINE), line, fill=TEXT, font=title_font)
    for index, item in enumerate(items):
        x0 = (index % columns) * COL_W
        y0 = HEADER_H + (index // columns) * ROW_H
        _draw_cell(sheet, draw, item, x0, y0, font)
    if truncated:
        more = f"+{total - len(items)} more images not shown; every problem is listed in report.md and report.json"
        draw.text((PAD, height - FOOTER_H + PAD), wrap(more, title_font, text_w, 1)[0], fill=TEXT, font=title_font)
    return sheet


def _draw_cell(
    sheet: Image.Image,
    draw: ImageDraw.ImageDraw,
    item: SheetItem,
    x0: int,
    y0: int,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
) -> None:
    bx, by = x0 + PAD, y0 + PAD
    draw.rectangle((bx, by, bx + CELL - 1, by + CELL - 1), fill=BOX)
    if item.file is None:
        draw.line((bx, by, bx + CELL - 1, by + CELL - 1), fill=MUTED, width=2)
        draw.line((bx, by + CELL - 1, bx + CELL - 1, by), fill=MUTED, width=2)
        label = "cannot decode"
        draw.text((bx + (CELL - font.getlength(label)) / 2, by + CELL / 2 - LINE), label, fill=TEXT, font=font)
    else:
        thumb = item.thumbnail if item.thumbnail is not None else thumbnail(item.file)
        at = (bx + (CELL - thumb.width) // 2, by + (CELL - thumb.height) // 2)
        sheet.paste(thumb, at)
        outline = _mask_outline(item, thumb.size)
        if outline is not None:
            sheet.paste(Image.new("RGB", thumb.size, MASK_COLOUR), at, outline)
    if item.rights == UNKNOWN:
        width = font.getlength(RIGHTS_BADGE) + 6
        draw.rectangle((bx, by, bx + width, by + LINE + 2), fill=RIGHTS_COLOUR)
        draw.text((bx + 3, by + 1), RIGHTS_BADGE, fill=(255, 255, 255), font=font)
    ty = by + CELL + PAD
    dims = f" {item.size[0]}x{item.size[1]}" if item.size else ""
    draw.text((bx + CELL - font.getlength(dims), ty), dims, fill=MUTED, font=font)
    name_w = int(CELL - font.getlength(dims))
    lines = [(line, TEXT) for line in wrap(PurePosixPath(item.path).name, font, name_w, NAME_LINES)]
    caption = wrap(item.caption, font, CELL, CAPTION_LINES) or ["(no caption)"]
    lines += [(line, TEXT if item.caption else MUTED) for line in caption]
    lines += [("", TEXT)] * (NAME_LINES + CAPTION_LINES - len(lines))
    severities = {p["severity"] for p in item.problems}
    if severities:
        worst = COLOURS["error" if "error" in severities else "warning"]
        codes = ", ".join(sorted({p["code"] for p in item.problems}))
        lines += [(line, worst) for line in wrap(codes, font, CELL, CODE_LINES)]
        draw.rectangle((x0 + 1, y0 + 1, x0 + COL_W - 2, y0 + ROW_H - 2), outline=worst, width=3)
    for n, (line, colour) in enumerate(lines):
        draw.text((bx, ty + n * LINE), line, fill=colour, font=font)


def _mask_outline(item: SheetItem, size: tuple[int, int]) -> Image.Image | None:
    """Where the loss mask's edge (grey level 128) runs on a thumbnail of `size`, 2 px wide; None without a
    usable mask (validation reports why)."""
    if item.mask is None or any(p["code"].startswith("mask_") for p in item.problems):
        return None  # a mask validation found unusable (too many pixels, say) is not decoded again
    try:
        grey = load_mask(item.mask, item.mask_alpha)
    except (OSError, ValueError):
        return None
    binary = grey.resize(size, Image.Resampling.BILINEAR).point(lambda v: 255 if v >= 128 else 0)
    return binary.filter(ImageFilter.FIND_EDGES).filter(ImageFilter.MaxFilter(3))


def write_contact_sheet(
    path: Path, snapshot_dir: Path, result: ValidationResult, captions: Mapping[str, str], max_images: int = MAX_IMAGES
) -> ContactSheet:
    """Render and write the sheet atomically (temp file beside it, then rename; unchanged bytes are kept)."""
    items = select_items(snapshot_dir, result, captions, max_images)
    total = len(result.infos)
    errors, warnings = result.counts["problems"]["error"], result.counts["problems"]["warning"]
    title = (
        f"{result.version}: {total} images, {errors} errors, {warnings} warnings; showing {len(items)}. "
        "Outline: red = error, orange = warning" + ("; light blue line: loss mask edge" if result.masks else "")
        + (f"; purple '{RIGHTS_BADGE}': rights unknown" if UNKNOWN in result.rights.values() else "")
    )
    buffer = io.BytesIO()
    # zlib level 1: a photo sheet compresses about as well as at the default level 6 (~15% larger), 3-4x faster
    render(items, title, total).save(buffer, "PNG", compress_level=PNG_LEVEL)
    atomic_write_bytes(path, buffer.getvalue(), readonly=True)
    return ContactSheet(path=path, shown=len(items), total=total)
