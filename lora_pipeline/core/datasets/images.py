"""Reading images the way training will: checks, conversions and a perceptual hash.

`inspect_image` opens one file strictly (no truncated-image tolerance, a pixel limit checked on the
header before anything is decoded), decodes it fully and reports every problem as (code, severity,
message). That one decode feeds the perceptual hash, the colour signature and, when asked, the contact-sheet
thumbnail (`thumbnail` makes the same one from a file). JPEGs are decoded at full size, not with Pillow's
DCT-scaled `draft`: a scaled decode would be ~30% cheaper but moves hash bits (up to 4 of 64 on 1,000 test
photos), and with them the near-duplicate findings near the threshold (benchmarks/RESULTS.md).

`load_rgb` is the one conversion training uses (full size), so what validation checks is what the model
sees: EXIF orientation applied, then 8-bit RGB (alpha composited on white, 16-bit scaled, CMYK and
palette converted). The snapshot keeps the original bytes; conversions only ever happen in memory.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from lora_pipeline.core.datasets.problems import Severity

# What Pillow raises on damaged image data. Anything else (TypeError, KeyError...) is a bug and propagates.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
# Codes after which the pixels could not be read: such an image has no hash and no thumbnail.
UNDECODABLE = frozenset({"zero_byte", "not_an_image", "decompression_bomb", "truncated_image", "conversion_failed"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
BIT_DEPTH = {"1": 1, "I": 32, "F": 32, "I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16}
# Pillow names some files by a sub-format; for extension checks they are the parent format.
FORMAT_ALIASES = {"MPO": "JPEG"}
# Multi-frame formats whose extra frames are a real animation (MPO's second frame is a phone preview).
ANIMATED_FORMATS = frozenset({"GIF", "PNG", "WEBP"})
HASH_SIZE = 8  # dHash of 8x8 = 64 bits
THUMBNAIL = 160  # contact-sheet cell, px
COLOUR_GRID = 4  # colour signature: mean RGB of a 4x4 grid, 48 bytes


class ImageProblem(NamedTuple):
    code: str
    severity: Severity
    message: str


@dataclass(frozen=True)
class ImageInfo:
    """What one image file is, as training would read it. Sizes are after EXIF orientation."""

    path: str
    bytes: int
    format: str | None = None
    width: int | None = None
    height: int | None = None
    raw_width: int | None = None  # as stored, before EXIF orientation
    raw_height: int | None = None
    mode: str | None = None
    bit_depth: int | None = None
    has_alpha: bool = False
    exif_orientation: int = 1
    frames: int = 1
    dhash: int | None = None  # 64-bit difference hash of the training view (None when undecodable)
    colour_signature: bytes | None = None  # mean RGB per cell of a 4x4 grid, to tell recolours from copies
    problems: tuple[ImageProblem, ...] = ()

    @property
    def decoded(self) -> bool:
        return not any(p.code in UNDECODABLE for p in self.problems)


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ALPHA_MODES or "transparency" in im.info


def colour_note(im: Image.Image) -> str | None:
    """How `to_rgb` converts this image, in words; None for plain 8-bit RGB (nothing to say)."""
    mode = im.mode
    if has_alpha(im):
        if mode == "P":
            kind = "palette transparency"
        elif mode in ALPHA_MODES:
            kind = f"an alpha channel ({mode})"
        else:
            kind = f"a transparent colour key ({mode})"
        return f"has {kind}; training composites it on a white background and drops the alpha"
    if mode.startswith("I;16"):
        return f"16-bit grayscale ({mode}); training scales it to 8-bit (value * 255 / 65535) and converts to RGB"
    if mode == "I":
        return (
            "32-bit integer grayscale (I); training clips it to 0-65535, scales it to 8-bit "
            "(value * 255 / 65535) and converts to RGB"
        )
    if mode == "F":
        return "32-bit float grayscale (F); training clips it to 0-255 and converts to RGB"
    if mode == "CMYK":
        return "CMYK; training converts it to RGB with Pillow's convert('RGB') (no ICC colour management)"
    if mode == "P":
        return "palette image (P); training converts it to RGB"
    if mode == "L":
        return "grayscale (L); training copies the gray channel into R, G and B"
    if mode == "1":
        return "1-bit black and white; training converts it to RGB (black 0, white 255)"
    if mode != "RGB":
        return f"mode {mode}; training converts it to RGB with Pillow's convert('RGB')"
    return None


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any decoded image to 8-bit RGB exactly as training does (see `colour_note`)."""
    if im.mode == "RGB" and not has_alpha(im):
        return im
    if has_alpha(im):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode.startswith("I;16") or im.mode == "I":
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        return im.convert("L").convert("RGB")
    return im.convert("RGB")


class PixelLimitError(ValueError):
    """An image whose header claims more pixels than the limit: refused before any pixel is decoded."""


def pixel_limit_problem(width: int, height: int, max_pixels: int) -> str | None:
    """One line when a header's size is above checks.max_pixels; None when it is within."""
    if width * height <= max_pixels:
        return None
    return f"header claims {width}x{height} = {width * height:,} pixels, above checks.max_pixels {max_pixels:,}"


_pillow_lock = threading.Lock()
_pillow_users = 0  # threads inside strict_pillow: the first saves Pillow's module settings, the last restores them
_pillow_saved: tuple[bool, int | None] = (False, None)


@contextmanager
def strict_pillow() -> Iterator[None]:
    """Refuse truncated files, and take Pillow's own pixel limit off: the one limit is the spec's
    checks.max_pixels, checked on the header (`open_limited`, `inspect_image`) for images and masks alike.
    Pillow's would refuse anything above 178,956,970 pixels whatever the spec allows, and warn below that.

    Both are module state in Pillow: set for the duration of the outermost call (in any thread) and restored
    afterwards, so code that relies on them elsewhere is unaffected.
    """
    global _pillow_users, _pillow_saved
    with _pillow_lock:
        if _pillow_users == 0:
            _pillow_saved = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
            ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = False, None
        _pillow_users += 1
    try:
        yield
    finally:
        with _pillow_lock:
            _pillow_users -= 1
            if _pillow_users == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = _pillow_saved


@contextmanager
def open_limited(path: Path, max_pixels: int | None) -> Iterator[Image.Image]:
    """The image (or mask) at `path` opened under `strict_pillow`; PixelLimitError, before anything is decoded,
    when its header claims more than `max_pixels`. None: no limit, for the files of a validated version (the
    limit was checked then, and the training gate checks their bytes since)."""
    with strict_pillow(), Image.open(path) as im:
        if max_pixels is not None and (problem := pixel_limit_problem(*im.size, max_pixels)):
            raise PixelLimitError(problem)
        yield im


# EXIF orientations that turn the picture by 90 degrees: training sees width and height swapped.
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def _valid_orientation(exif: Image.Exif) -> int:
    value = exif.get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _orientation(im: Image.Image) -> int:
    return _valid_orientation(im.getexif())


def header_orientation(im: Image.Image) -> int:
    """The EXIF orientation from what Pillow read when opening the file, without decoding any pixels.

    The base class's getexif reads only the header's EXIF and XMP; a PNG's own getexif would first decode
    the whole image to look for an eXIf chunk after the pixel data (not allowed by the PNG spec since 2017).
    """
    return _valid_orientation(Image.Image.getexif(im))


def _dhash(gray: Image.Image) -> int:
    """Difference hash: 1 bit per horizontally adjacent pixel pair of a 9x8 thumbnail."""
    px = np.asarray(gray.resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.BOX), dtype=np.int16)
    bits = (px[:, 1:] > px[:, :-1]).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _fingerprints(rgb: Image.Image) -> tuple[int, bytes]:
    small = rgb.resize((64, 64), Image.Resampling.BOX)  # one pass over the full image; the rest is tiny
    colour = small.resize((COLOUR_GRID, COLOUR_GRID), Image.Resampling.BOX).tobytes()
    return _dhash(small.convert("L")), colour


def _extension_note(path: Path, fmt: str | None) -> str | None:
    expected = Image.registered_extensions().get(path.suffix.lower())
    actual = FORMAT_ALIASES.get(fmt or "", fmt)
    if fmt and expected != actual:
        return f"holds {actual} data but has the extension '{path.suffix}'; tools that trust extensions may fail"
    return None


Inspected = tuple[ImageInfo, Image.Image | None]  # the thumbnail when asked for and the file decodes
# Which files get a thumbnail from their inspection: none, those with a problem of their own, all.
Thumbnails = Literal["none", "flagged", "all"]


def inspect_image(path: Path, max_pixels: int) -> ImageInfo:
    """Check one file in the order: empty, identifiable, pixel limit (header only), decode, conversion."""
    return inspect_with_thumbnail(path, max_pixels, "none")[0]


def inspect_with_thumbnail(path: Path, max_pixels: int, want: Thumbnails) -> Inspected:
    """`inspect_image`, and the contact-sheet thumbnail from the same decode as `want` says (inspection.py
    runs it for many files in worker processes)."""
    size = path.stat().st_size
    base = {"path": str(path), "bytes": size}
    if size == 0:
        return ImageInfo(**base, problems=(ImageProblem("zero_byte", "error", "file is empty (0 bytes)"),)), None
    with path.open("rb") as fh, strict_pillow():  # file-system errors raise here, not as image problems
        try:
            im = Image.open(fh)
        except UnidentifiedImageError:
            msg = "not a readable image: Pillow cannot identify the file format"
            return ImageInfo(**base, problems=(ImageProblem("not_an_image", "error", msg),)), None
        except DECODE_ERRORS as exc:
            msg = f"the image header is cut short or damaged ({exc})"
            return ImageInfo(**base, problems=(ImageProblem("truncated_image", "error", msg),)), None
        with im:
            return _inspect_open(path, im, base, max_pixels, want)


def _inspect_open(
    path: Path, im: Image.Image, base: dict[str, str | int], max_pixels: int, want: Thumbnails
) -> Inspected:
    raw_w, raw_h = im.size
    header = {
        **base,
        "format": im.format,
        "width": raw_w,
        "height": raw_h,
        "raw_width": raw_w,
        "raw_height": raw_h,
        "mode": im.mode,
        "bit_depth": BIT_DEPTH.get(im.mode, 8),
    }
    problems: list[ImageProblem] = []
    if note := _extension_note(path, im.format):
        problems.append(ImageProblem("extension_mismatch", "warning", note))
    if msg := pixel_limit_problem(raw_w, raw_h, max_pixels):
        problems.append(ImageProblem("decompression_bomb", "error", f"refused before decoding: {msg}"))
        return ImageInfo(**header, problems=tuple(problems)), None
    try:
        frames = getattr(im, "n_frames", 1)  # GIF counts frames by reading them all: part of the decode
        im.load()
    except DECODE_ERRORS as exc:
        problems.append(ImageProblem("truncated_image", "error", f"pixel data cannot be fully decoded ({exc})"))
        return ImageInfo(**header, problems=tuple(problems)), None
    try:
        orientation = _orientation(im)
        upright = ImageOps.exif_transpose(im) if orientation != 1 else im
        rgb = to_rgb(upright)
        dhash, colour = _fingerprints(rgb)
    except DECODE_ERRORS as exc:
        msg = f"decodes but cannot be converted to RGB for training ({exc})"
        problems.append(ImageProblem("conversion_failed", "error", msg))
        return ImageInfo(**header, problems=tuple(problems)), None
    if note := colour_note(im):
        problems.append(ImageProblem("colour_mode", "warning", note))
    if frames > 1 and im.format in ANIMATED_FORMATS:
        msg = f"animated {im.format} with {frames} frames; training uses only the first frame"
        problems.append(ImageProblem("animated", "warning", msg))
    thumb = _shrink(rgb) if want == "all" or (want == "flagged" and problems) else None
    return ImageInfo(
        **{**header, "width": upright.width, "height": upright.height},
        has_alpha=has_alpha(im),
        frames=frames,
        exif_orientation=orientation,
        dhash=dhash,
        colour_signature=colour,
        problems=tuple(problems),
    ), thumb


def _shrink(rgb: Image.Image) -> Image.Image:
    """The contact-sheet thumbnail of an upright RGB picture (fits a THUMBNAIL box; never enlarged)."""
    thumb = rgb.copy()
    thumb.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)
    return thumb


def load_rgb(path: Path, max_pixels: int | None = None) -> Image.Image:
    """The image as training sees it: EXIF orientation applied, 8-bit RGB. Raises on damaged files, and
    PixelLimitError above `max_pixels` (None: a validated version's file, see `open_limited`)."""
    with open_limited(path, max_pixels) as im:
        im.load()
        return to_rgb(ImageOps.exif_transpose(im))


def thumbnail(path: Path) -> Image.Image:
    """The contact-sheet thumbnail of a file: the same pixels as `inspect_with_thumbnail` gives."""
    return _shrink(load_rgb(path))
