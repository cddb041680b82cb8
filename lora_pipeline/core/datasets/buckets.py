"""kohya-ss aspect-ratio buckets: which (width, height) each image is trained at.

Mirrors kohya's `make_bucket_resolutions` and `BucketManager.select_bucket` (enable_bucket on,
no_upscale off), so the histogram in the dataset report is the one the trainer will produce.
With `resolutions` (multi-resolution training, as ai-toolkit's resolution list) every image has a bucket at each
side, chosen among that side's buckets.
`BucketSettings` holds a recipe's bucket options; its defaults are the recipe defaults (recipe_fields.py reads
them from here), so the report of a version that no recipe trains on shows what a recipe would use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BucketSettings:
    """A recipe's bucket options, under the recipe's field names."""

    resolution: int = 512  # the square side: buckets keep the area at most resolution**2
    enable_bucket: bool = True  # false: every image is trained at the resolution x resolution square
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    resolutions: tuple[int, ...] = ()  # multi-resolution training: every image at each of these sides (empty: one)

    @property
    def sides(self) -> tuple[int, ...]:
        """The square sides an epoch trains every image at: `resolutions`, or `resolution` alone."""
        return tuple(self.resolutions) or (self.resolution,)

    def buckets(self, side: int | None = None) -> list[tuple[int, int]]:
        """Every bucket an image may land in at `side` (default: `resolution`): kohya's buckets, or the one square
        without enable_bucket."""
        side = self.resolution if side is None else side
        if not self.enable_bucket:
            return [(side, side)]
        return bucket_resolutions(side, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps)


DEFAULT_BUCKETS = BucketSettings()


def bucket_resolutions(resolution: int, min_reso: int, max_reso: int, step: int) -> list[tuple[int, int]]:
    """Every bucket for a square `resolution` (max area resolution**2), sorted like kohya's."""
    max_area = resolution * resolution
    side = int(math.sqrt(max_area) // step) * step
    resos = {(side, side)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, int((max_area // width) // step) * step)
        if height >= min_reso:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


def select_bucket(width: int, height: int, resos: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (the first one on a tie, as kohya)."""
    if (width, height) in resos:
        return width, height
    aspect = width / height
    return min(resos, key=lambda r: abs(r[0] / r[1] - aspect))
