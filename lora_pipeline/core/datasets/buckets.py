"""kohya-ss aspect-ratio buckets: which (width, height) each image is trained at.

Mirrors kohya's `make_bucket_resolutions` and `BucketManager.select_bucket` (enable_bucket on,
no_upscale off), so the histogram in the dataset report is the one the trainer will produce.
"""

from __future__ import annotations

import math


def bucket_resolutions(
    resolution: int = 512, min_reso: int = 256, max_reso: int = 1024, step: int = 64
) -> list[tuple[int, int]]:
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
