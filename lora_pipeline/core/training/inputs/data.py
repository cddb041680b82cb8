"""What a training run reads from a dataset snapshot: image rows, captions, the split, buckets and batches.

The snapshot is trusted only as far as its manifest: the manifest rows must hash to snapshot.json's
`manifest_root`, and every image and caption read for training must match its row's sha256, so the root
recorded in a LoRA file really names the bytes it was trained on.

Validation split: image rows in sha256 order (a content-derived, stable shuffle), the first
`round(n * validation_split)` (at least one when the split is positive, never all) are held out.

Buckets follow kohya (enable_bucket, no_upscale off): the recipe's `BucketSettings` and
`buckets.select_bucket`; with multi-resolution training (`resolutions`) every image is listed once per side, with
that side's bucket, so an epoch trains it at each side and the latent cache (keyed by bucket and crop) holds one
latent per side; each image is resized to cover its bucket (the side that is short for the bucket's
aspect ratio fits exactly) and center-cropped. Without buckets every image goes to a square
`resolution` bucket the same way. Each epoch repeats every image `repeats` times (the spec's repeats),
shuffles within each bucket, cuts batches inside a bucket and shuffles the batches.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image

from lora_pipeline.core.datasets.buckets import BucketSettings, select_bucket
from lora_pipeline.core.datasets.captions.caption_files import snapshot_caption
from lora_pipeline.core.datasets.captions.tags import caption_path, split_tags
from lora_pipeline.core.datasets.images import load_rgb
from lora_pipeline.core.datasets.masks import ALPHA, load_mask
from lora_pipeline.core.datasets.snapshot.manifest import ManifestRow, manifest_root, read_manifest, read_snapshot_info
from lora_pipeline.core.datasets.sources.regular_files import CAPTION_LIMIT, read_regular, sha256_regular
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_bytes
from lora_pipeline.core.paths import MANIFEST, SNAPSHOT
from lora_pipeline.core.training.inputs.augment import View
from lora_pipeline.core.training.seeds import Stream, numpy_rng

DECODE_THREADS = 8  # images decoded at once where a step reads many (their checks, the latent cache)


@dataclass(frozen=True)
class TrainImage:
    """One snapshot image as training sees it. Sizes are (width, height) in pixels."""

    rel: str  # path inside the snapshot, as in the manifest
    path: Path
    sha256: str
    caption: str
    folder: str  # kohya image dir, e.g. "10_hdaesth"
    size: tuple[int, int]  # after EXIF orientation
    bucket: tuple[int, int]
    resized: tuple[int, int]  # the size the image is scaled to before the center crop
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    mask: Path | None = None  # the loss mask's file (the image itself for an alpha mask); None: no mask
    mask_alpha: bool = False
    is_reg: bool = False  # a regularisation (class) image

    def _view(self, image: Image.Image, view: View | None, resample: Image.Resampling) -> Image.Image:
        image = image.resize(self.resized, resample)
        top, left = view.crop_top_left if view else self.crop_top_left
        width, height = self.bucket
        image = image.crop((left, top, left + width, top + height))
        if view and view.flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def mask_pixels(self, view: View | None = None) -> torch.Tensor:
        """(1, h, w) float32 in [0, 1] at the bucket's size, cropped and flipped like the image; ones when the
        image has no mask (kohya's alpha_mask default)."""
        width, height = self.bucket
        if self.mask is None:
            return torch.ones(1, height, width)
        grey = self._view(load_mask(self.mask, self.mask_alpha), view, Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)[None]

    def pixels(self, view: View | None = None) -> torch.Tensor:
        """(3, h, w) float32 in [-1, 1] at the bucket's size: the center crop, or the crop and flip of `view`."""
        image = self._view(load_rgb(self.path), view, Image.Resampling.LANCZOS)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class TrainingData:
    version: str
    snapshot_dir: Path
    manifest_root: str
    spec_sha256: str
    repeats: int
    train: tuple[TrainImage, ...]
    validation: tuple[TrainImage, ...]
    image_rows: tuple[ManifestRow, ...]  # the manifest's image rows, for the MLflow dataset input
    reg: tuple[TrainImage, ...] = ()  # regularisation images: never held out; repeated as their folder says
    flip_aug: bool = False  # the spec's flip_aug (kohya's dataset config): a run flips if it or the recipe says so

    @property
    def num_train_images(self) -> int:
        """Counted with repeats, as kohya's ss_num_train_images."""
        return len(self.train) * self.repeats

    @property
    def num_reg_images(self) -> int:
        """Regularisation images with their folder's repeats, as kohya's ss_num_reg_images."""
        return sum(folder_repeats(image.folder) for image in self.reg)

    @property
    def reg_repeats(self) -> tuple[int, ...]:
        """Each regularisation image's repeats once mixed in (kohya's fill, `mix_reg_repeats`; 0: not used)."""
        return tuple(mix_reg_repeats([folder_repeats(image.folder) for image in self.reg], self.num_train_images))

    @property
    def has_masks(self) -> bool:
        return any(image.mask is not None for image in self.train)

    @property
    def images(self) -> tuple[TrainImage, ...]:
        """What an epoch draws from: the training images, then the regularisation images."""
        return self.train + self.reg

    @property
    def image_repeats(self) -> list[int]:
        """Repeats per image of `images`."""
        return [self.repeats] * len(self.train) + list(self.reg_repeats)

    def reg_dataset_dirs(self) -> dict[str, dict[str, int]]:
        """kohya's ss_reg_dataset_dirs."""
        return _kohya_dirs(_once(self.reg), folder_repeats)

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """kohya's ss_dataset_dirs over the training images (each once, whatever the sides it trains at)."""
        return _kohya_dirs(_once(self.train), lambda _folder: self.repeats)

    def bucket_info(self, bucketing: bool, resolutions: Sequence[tuple[int, int]]) -> dict[str, Any] | None:
        """kohya's ss_bucket_info (None without `bucketing`): {"buckets": {index of the bucket in `resolutions`
        (kohya's order): {"resolution": (w, h), "count": images with their repeats}}, "mean_img_ar_error": the
        mean |bucket's aspect ratio - image's|, each image once}; the buckets no image lands in are left out."""
        if not bucketing:
            return None
        counts: Counter[tuple[int, int]] = Counter()
        for image, repeats in zip(self.images, self.image_repeats, strict=True):
            counts[image.bucket] += repeats
        errors = [abs(i.bucket[0] / i.bucket[1] - i.size[0] / i.size[1]) for i in self.images]
        return {"buckets": {index: {"resolution": reso, "count": counts[reso]}
                            for index, reso in enumerate(resolutions) if counts[reso]},
                "mean_img_ar_error": sum(errors) / len(errors) if errors else 0}

    def tag_frequency(self, separator: str) -> dict[str, dict[str, int]]:
        """kohya's ss_tag_frequency over the training captions: {image dir: {lower-cased tag: count}}."""
        frequency: dict[str, Counter[str]] = defaultdict(Counter)
        for image in _once(self.train):
            frequency[image.folder].update(tag.lower() for tag in split_tags(image.caption, separator))
        return {
            folder: dict(sorted(tags.items(), key=lambda item: (-item[1], item[0])))
            for folder, tags in sorted(frequency.items())
        }


def _once(images: Sequence[TrainImage]) -> list[TrainImage]:
    """Each image once: multi-resolution training lists an image at each side."""
    return list({image.rel: image for image in images}.values())


def _kohya_dirs(images: Sequence[TrainImage], repeats: Callable[[str], int]) -> dict[str, dict[str, int]]:
    """{image dir: {"n_repeats", "img_count"}}, a folder's repeats given by `repeats(folder)`."""
    counts = Counter(image.folder for image in images)
    return {folder: {"n_repeats": repeats(folder), "img_count": n} for folder, n in sorted(counts.items())}


def fit_to_bucket(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized size, crop top-left) that scale an image to cover `bucket` and center-crop it (kohya's rounding)."""
    width, height = size
    bucket_w, bucket_h = bucket
    scale = bucket_h / height if width / height > bucket_w / bucket_h else bucket_w / width
    resized = (max(bucket_w, int(width * scale + 0.5)), max(bucket_h, int(height * scale + 0.5)))
    return resized, ((resized[1] - bucket_h) // 2, (resized[0] - bucket_w) // 2)


def folder_repeats(folder: str) -> int:
    """The repeats of a kohya folder name `<repeats>_<name>`."""
    head = folder.split("_", 1)[0]
    return int(head) if head.isdigit() else 1


def mix_reg_repeats(reg_repeats: Sequence[int], num_train_images: int) -> list[int]:
    """kohya's DreamBoothDataset: regularisation images are registered with their repeats until they are as
    many as the training images (with repeats), then their repeats grow by one, in order, until they match; with
    more regularisation samples than training samples the later ones are not used (0)."""
    out = [0] * len(reg_repeats)
    n, first = 0, True
    while reg_repeats and n < num_train_images:
        for i, repeats in enumerate(reg_repeats):
            out[i] = repeats if first else out[i] + 1
            n += repeats if first else 1
            if n >= num_train_images:
                break
        first = False
    return out


def validation_count(n_images: int, validation_split: float) -> int:
    if validation_split <= 0 or n_images < 2:
        return 0
    return min(n_images - 1, max(1, round(n_images * validation_split)))


def split_train_validation(
    image_rows: Sequence[ManifestRow], validation_split: float
) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """(train rows, validation rows), both in sha256 order; see the module docstring."""
    ordered = sorted(image_rows, key=lambda row: (row.sha256, row.path))
    n_val = validation_count(len(ordered), validation_split)
    return ordered[n_val:], ordered[:n_val]


def _checked_bytes(snapshot_dir: Path, rel: str, row: ManifestRow) -> None:
    """The file must be a regular file of the snapshot (no link on the way down) holding the row's bytes."""
    path = snapshot_dir / rel
    try:
        digest = sha256_regular(path, beneath=snapshot_dir)
    except FileNotFoundError:
        raise UserError("missing from the snapshot (listed in its manifest)", path) from None
    if digest != row.sha256:
        raise UserError("content differs from the manifest; run `lora-pipeline verify`", path)


def _read_caption(snapshot_dir: Path, image_rel: str, caption_rows: dict[str, ManifestRow]) -> str:
    rel = caption_path(image_rel)
    row = caption_rows.get(image_rel)
    if row is None or row.path != rel:
        raise UserError(f"no caption for {image_rel} in the manifest; materialize caption_set first",
                        snapshot_dir / MANIFEST)
    path = snapshot_dir / rel
    data = read_regular(path, CAPTION_LIMIT, beneath=snapshot_dir)
    if sha256_bytes(data) != row.sha256:
        raise UserError("content differs from the manifest; run `lora-pipeline verify`", path)
    return snapshot_caption(path)


def _checked_size(snapshot_dir: Path, row: ManifestRow, mask_rows: dict[str, ManifestRow]) -> tuple[int, int]:
    """The image's size, once its bytes (and its mask file's) match the manifest and it decodes."""
    path = snapshot_dir / row.path
    _checked_bytes(snapshot_dir, row.path, row)
    mask = row.mask
    if mask and mask != ALPHA:
        if mask not in mask_rows:
            raise UserError(f"the mask {mask} of {row.path} is not in the manifest", snapshot_dir / MANIFEST)
        _checked_bytes(snapshot_dir, mask, mask_rows[mask])
    try:
        return load_rgb(path).size
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot be decoded: {exc}", path) from None


def _train_image(snapshot_dir: Path, row: ManifestRow, caption: str, size: tuple[int, int],
                 resos: list[tuple[int, int]] | None) -> TrainImage:
    path = snapshot_dir / row.path
    mask = row.mask
    bucket = select_bucket(*size, resos)
    resized, crop = fit_to_bucket(size, bucket)
    return TrainImage(
        rel=row.path, path=path, sha256=row.sha256, caption=caption,
        folder=PurePosixPath(row.path).parent.name, size=size, bucket=bucket, resized=resized,
        crop_top_left=crop, mask=None if not mask else path if mask == ALPHA else snapshot_dir / mask,
        mask_alpha=mask == ALPHA, is_reg=row.kind == "reg_image",
    )


def load_training_data(snapshot_dir: Path, buckets: BucketSettings, validation_split: float) -> TrainingData:
    """Read and check a captioned snapshot, hold out `validation_split` of its images and assign every image its
    bucket."""
    info = read_snapshot_info(snapshot_dir)
    if not info.captions_complete:
        raise UserError("the snapshot has no complete caption set; materialize caption_set first",
                        snapshot_dir / SNAPSHOT)
    rows = read_manifest(snapshot_dir)
    if manifest_root(rows) != info.manifest_root:
        raise UserError(f"rows do not match manifest_root in {SNAPSHOT}; run `lora-pipeline verify`",
                        snapshot_dir / MANIFEST)
    repeats = info.spec.get("repeats")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise UserError("spec.repeats must be a positive integer", snapshot_dir / SNAPSHOT)
    image_rows = [r for r in rows if r.kind == "image"]
    if not image_rows:
        raise UserError("the snapshot has no images", snapshot_dir / MANIFEST)
    caption_rows = {r.image: r for r in rows if r.kind in ("caption", "reg_caption")}
    mask_rows = {r.path: r for r in rows if r.kind == "mask"}
    reg_rows = sorted((r for r in rows if r.kind == "reg_image"), key=lambda r: r.path)
    train_rows, val_rows = split_train_validation(image_rows, validation_split)
    bucket_lists = [buckets.buckets(side) for side in buckets.sides]

    def images(selected: list[ManifestRow]) -> tuple[TrainImage, ...]:
        """Each row at every side (multi-resolution): all rows at the first side, then at the next. Each image is
        checked and decoded once, by a few threads (Pillow and hashlib release the GIL): one thread took 1.1 s
        for the 200 photos of the GPU drill."""
        captions = [_read_caption(snapshot_dir, row.path, caption_rows) for row in selected]
        with ThreadPoolExecutor(max_workers=min(DECODE_THREADS, os.cpu_count() or 1)) as pool:
            sizes = list(pool.map(lambda row: _checked_size(snapshot_dir, row, mask_rows), selected))
        return tuple(_train_image(snapshot_dir, row, caption, size, resos) for resos in bucket_lists
                     for row, caption, size in zip(selected, captions, sizes, strict=True))

    return TrainingData(
        version=info.version, snapshot_dir=snapshot_dir,
        manifest_root=info.manifest_root, spec_sha256=info.spec_sha256 or "", repeats=repeats,
        train=images(train_rows), validation=images(val_rows),
        image_rows=tuple(sorted(image_rows, key=lambda r: r.path)), reg=images(reg_rows),
        flip_aug=info.spec.get("flip_aug") is True,
    )


def _repeats_of(images: Sequence[TrainImage], repeats: int | Sequence[int]) -> Sequence[int]:
    return [repeats] * len(images) if isinstance(repeats, int) else repeats


def steps_per_epoch(images: Sequence[TrainImage], repeats: int | Sequence[int], batch_size: int) -> int:
    """`repeats`: one number for every image, or one per image (regularisation images mixed in)."""
    counts: Counter[tuple[int, int]] = Counter()
    for image, n in zip(images, _repeats_of(images, repeats), strict=True):
        counts[image.bucket] += n
    return sum(math.ceil(n / batch_size) for n in counts.values() if n)


def epoch_batches(
    images: Sequence[TrainImage], repeats: int | Sequence[int], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """Indices into `images`, one list per batch, every batch inside one bucket; order from (seed, epoch).
    Regularisation images share the buckets and batches of the training images, as in kohya."""
    rng = numpy_rng(seed, Stream.ORDER, epoch)
    by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, (image, n) in enumerate(zip(images, _repeats_of(images, repeats), strict=True)):
        by_bucket[image.bucket].extend([index] * n)
    batches: list[list[int]] = []
    for bucket in sorted(by_bucket):
        items = [by_bucket[bucket][j] for j in rng.permutation(len(by_bucket[bucket]))]
        batches.extend(items[k:k + batch_size] for k in range(0, len(items), batch_size))
    return [batches[j] for j in rng.permutation(len(batches))]


def accumulation_in_effect(images: Sequence[TrainImage], repeats: int | Sequence[int], batch_size: int,
                           accumulation: int) -> int:
    """The most batches of `batch_size` any step accumulates: a step stays inside one bucket (`epoch_batches` of
    batch_size x accumulation), so where every bucket holds at most `batch_size` images (repeats counted) each
    step is one batch, whatever `accumulation` says. kohya accumulates across buckets instead."""
    sizes: Counter[tuple[int, int]] = Counter()
    for image, n in zip(images, _repeats_of(images, repeats), strict=True):
        sizes[image.bucket] += n
    return max(1, min(accumulation, max((math.ceil(size / batch_size) for size in sizes.values()), default=1)))
