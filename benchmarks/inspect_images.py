"""Throughput of `inspect_images` (full decode + hash) on generated ~1 MP JPEGs.

    .venv/bin/python benchmarks/inspect_images.py [--count 1000] [--workers 2] [--dir /tmp/lp-bench-images]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from PIL import Image, ImageChops, ImageFilter

from lora_pipeline.core.datasets.checks.inspection import inspect_images


def make_images(folder: Path, count: int) -> list[Path]:
    """Photo-like 1152x864 JPEGs (blurred noise plus a gradient), each shifted so no two are identical."""
    folder.mkdir(parents=True, exist_ok=True)
    size = (1152, 864)
    noise = Image.effect_noise(size, 64).filter(ImageFilter.GaussianBlur(1))
    gradient = Image.linear_gradient("L").resize(size)
    base = Image.merge("RGB", (noise, gradient, ImageChops.add(noise, gradient, scale=2)))
    paths = []
    for i in range(count):
        path = folder / f"img_{i:04d}.jpg"
        if not path.exists():
            ImageChops.offset(base, i * 7, i * 3).save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/lp-bench-images"))
    args = parser.parse_args()
    paths = make_images(args.dir, args.count)
    start = time.perf_counter()
    infos = inspect_images(paths, max_pixels=64_000_000, workers=args.workers)
    elapsed = time.perf_counter() - start
    assert all(info.decoded for info in infos)
    print(f"{len(infos)} images in {elapsed:.2f} s with {args.workers} workers: {len(infos) / elapsed:.0f} images/s")


if __name__ == "__main__":
    main()
