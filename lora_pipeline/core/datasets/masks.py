"""Loss masks (kohya's `masked_loss` / `alpha_mask`): which pixels of an image the loss counts.

A batch source with `masks: file` carries a mask per image, `<stem>.mask.png` beside it (a mask file is never
an image of its own); with `masks: alpha` the image's own alpha channel is the mask. A mask is a grey image:
white counts fully, black not at all. It is copied into the snapshot beside its image (manifest row
`kind: mask` naming its `image`; the image row names its `mask`, or `"alpha"`), and checked before any GPU
time: it is held to the images' pixel limit (checks.max_pixels) before it is decoded, must decode, have one
channel, match the image's size after EXIF orientation (its own orientation applied too) and not be all black; a
missing mask is an error when the source asks for masks.

Training (recipe `masked_loss`) scales each mask to the latent size by area averaging and weights the
per-element loss with it before the mean, as kohya's `apply_masked_loss`.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from lora_pipeline.core.datasets.images import PixelLimitError, has_alpha, open_limited

MASK_SUFFIX = ".mask.png"
ALPHA = "alpha"
MaskMode = Literal["none", "file", "alpha"]


def is_mask(path: str) -> bool:
    return path.lower().endswith(MASK_SUFFIX)


def mask_path_for(image_path: str) -> str:
    """`<folder>/<stem>.mask.png` for `<folder>/<stem>.<ext>` (posix paths)."""
    return posixpath.splitext(image_path)[0] + MASK_SUFFIX


def load_mask(path: Path, alpha: bool, max_pixels: int | None = None) -> Image.Image:
    """The mask as training reads it: mode L, EXIF orientation applied; from the image's alpha when `alpha`.
    PixelLimitError above `max_pixels`, the images' limit (None: a validated version's file, as `load_rgb`)."""
    with open_limited(path, max_pixels) as im:
        im.load()
        oriented = ImageOps.exif_transpose(im)
        if alpha:
            return oriented.convert("RGBA").getchannel("A")
        return oriented.convert("L")


def mask_problems(image: Path, mask: Path | None, alpha: bool, image_size: tuple[int, int] | None,
                  max_pixels: int) -> list[tuple[str, str]]:
    """(code, message) for every way the mask of `image` is unusable; `image_size` is the image's size after
    EXIF orientation (None when the image itself does not decode: nothing to compare with). A mask is held to
    the images' pixel limit, `max_pixels` (the spec's checks.max_pixels), before it is decoded."""
    if alpha:
        try:
            with open_limited(image, max_pixels) as im:
                if not has_alpha(im):
                    return [("mask_missing", f"the source says masks: {ALPHA} but the image has no alpha channel")]
        except (OSError, ValueError):  # PixelLimitError included
            return []  # the image check reports it
        source = "the alpha channel"
    else:
        if mask is None or not mask.is_file():
            return [("mask_missing", f"the source says masks: file but there is no {MASK_SUFFIX} beside the image")]
        try:
            with open_limited(mask, max_pixels) as im:
                bands = len(im.getbands())
        except PixelLimitError as exc:
            return [("mask_too_large", f"the mask is refused before decoding: {exc}")]
        except (OSError, ValueError) as exc:
            return [("mask_undecodable", f"the mask cannot be decoded: {exc}")]
        if bands != 1:
            return [("mask_channels", f"the mask has {bands} channels; it must be a single-channel (grey) image")]
        source = "the mask"
    try:
        grey = load_mask(mask if mask is not None and not alpha else image, alpha, max_pixels)
    except (OSError, ValueError) as exc:
        return [("mask_undecodable", f"{source} cannot be decoded: {exc}")]
    out = []
    if image_size is not None and grey.size != image_size:
        out.append(("mask_size", f"{source} is {grey.size[0]}x{grey.size[1]} but the image is "
                                 f"{image_size[0]}x{image_size[1]} (after EXIF orientation)"))
    if not np.asarray(grey).any():
        out.append(("mask_empty", f"{source} is all black: the loss would count none of the image"))
    return out
