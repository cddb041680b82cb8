"""kohya's `flip_aug` and `random_crop`: how each image of a batch is seen at one step, from (seed, step).

`flip_aug` mirrors an image left-right with chance 1/2; `random_crop` takes the bucket-sized crop of the
resized image at a random place instead of the center (kohya: only where the resized image is larger than
the bucket). A flip mirrors text and logos too: the trainer warns when captions mention them (`flip_warning`),
and so does the dataset report when the spec sets `flip_aug` (caption_lint.py).

`flip_aug` can be set in the recipe (kohya's `--flip_aug`) or in the dataset spec (kohya's dataset config, where
it is a subset option); a run flips when either says so.

Latents: kohya refuses `cache_latents` with `random_crop` (recipe_checks.py does the same); with `flip_aug` and
`cache_latents` it caches each image twice, as it is and mirrored, and picks one per step (encode.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from lora_pipeline.core.datasets.captions.caption_lint import TEXT_WORDS
from lora_pipeline.core.training.seeds import Stream, numpy_rng


@dataclass(frozen=True)
class View:
    """How one image is seen at one step: mirrored or not, and the (top, left) of its crop in the resized image."""

    flip: bool
    crop_top_left: tuple[int, int]


class Sized(Protocol):
    """What `step_views` reads of an image (TrainImage has these)."""

    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop_top_left: tuple[int, int]


def step_views(images: Sequence[Sized], flip_aug: bool, random_crop: bool, seed: int, step: int) -> list[View]:
    """The view of each image of one batch; the center crop, unmirrored, when both options are off."""
    if not (flip_aug or random_crop):
        return [View(False, image.crop_top_left) for image in images]
    rng = numpy_rng(seed, Stream.AUGMENT, step)
    views = []
    for image in images:
        flip = bool(flip_aug and rng.random() < 0.5)
        crop = image.crop_top_left
        if random_crop:
            (width, height), (bucket_w, bucket_h) = image.resized, image.bucket
            crop = (int(rng.integers(0, height - bucket_h + 1)), int(rng.integers(0, width - bucket_w + 1)))
        views.append(View(flip, crop))
    return views


def flip_warning(captions: Sequence[str]) -> str | None:
    """A warning line when flip_aug would mirror writing that captions mention; None when none does."""
    hits = [c for c in captions if TEXT_WORDS.search(c)]
    if not hits:
        return None
    return (f"flip_aug is on and {len(hits)} of {len(captions)} training captions mention text or logos "
            f"(e.g. {hits[0][:80]!r}); a flip mirrors them")
