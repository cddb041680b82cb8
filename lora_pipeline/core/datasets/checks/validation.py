"""Validate a dataset snapshot before any GPU time is spent (docs/contract.md, principle 5).

`validate_dataset` gathers, in one `problems` list: the snapshot's scan problems (snapshot.json),
the caption plan's problems, and its own checks on the copied images: readability (see images.py),
dimensions against the spec's `checks`, exact duplicates (manifest sha256), near duplicates
(perceptual hash), caption files without an image, loss masks (masks.py), decodes and sizes of the
regularisation images, and that there is a training image at all. It also counts pairs per source and predicts
the kohya aspect-ratio buckets under the bucket settings of the recipes that train on the version
(`bucket_summaries`; the recipe defaults when none does).
Errors block training (`problems.errors_in`); warnings are for a person.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from PIL import Image

from lora_pipeline.core.datasets.buckets import DEFAULT_BUCKETS, BucketSettings, select_bucket
from lora_pipeline.core.datasets.checks.inspection import inspect_batch, inspect_images, take_early
from lora_pipeline.core.datasets.checks.near_duplicates import near_duplicate_pairs
from lora_pipeline.core.datasets.checks.rights_check import image_rights, rights_counts, rights_problems
from lora_pipeline.core.datasets.images import ImageInfo
from lora_pipeline.core.datasets.masks import ALPHA, mask_problems
from lora_pipeline.core.datasets.problems import Problem, Severity, errors_in, problem
from lora_pipeline.core.datasets.snapshot.manifest import ManifestRow, read_manifest, read_snapshot_info
from lora_pipeline.core.datasets.spec import DatasetSpec
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import SNAPSHOT, DataRoot

NEAR_DUPLICATE_DISTANCE = 6  # max Hamming distance of two 64-bit dHashes
# Two images with the same structure but different colours (a red and a blue body from the same view)
# are variations, not copies: a near duplicate must also match within this much (0-255) in every cell
# of the 4x4 mean-colour grid. Re-encoding or slight resizing moves cells by a few units.
NEAR_DUPLICATE_COLOUR = 24
SEVERITY_FOR: dict[str, Severity] = {"warn": "warning", "error": "error"}
SEVERITY_ORDER = {"error": 0, "warning": 1}


class CaptionPlanLike(Protocol):
    """What validation reads from captions.plan_captions' CaptionPlan."""

    captions: Mapping[str, str]  # snapshot-relative image path -> caption text
    problems: list[Problem]


@dataclass
class ValidationResult:
    version: str
    manifest_root: str  # of the snapshot as validated: a report is stale once this changes
    scope: str  # "dataset:<version>": the scope of problems found in the snapshot
    counts: dict[str, Any]
    problems: list[Problem]
    buckets: dict[str, Any]  # bucket_summary of the first bucket settings (bucket_summaries)
    checks: dict[str, Any]  # the spec's checks, as applied
    infos: dict[str, ImageInfo] = field(default_factory=dict)  # by snapshot-relative image path
    exact_duplicates: list[tuple[str, str]] = field(default_factory=list)  # (copy, first seen)
    near_duplicates: list[tuple[str, str, int]] = field(default_factory=list)  # (copy, first seen, distance)
    # contact-sheet thumbnails made by the validation decode, by path (a bounded few: see inspection.py)
    thumbnails: dict[str, Image.Image] = field(default_factory=dict, repr=False)
    masks: dict[str, str] = field(default_factory=dict)  # image path -> its mask's path, or "alpha"
    other_buckets: list[dict[str, Any]] = field(default_factory=list)  # summaries of further bucket settings
    rights: dict[str, str] = field(default_factory=dict)  # image path -> its rights (rights_check.py)
    rights_by_batch: dict[str, Any] = field(default_factory=dict)  # snapshot.json's rights: origin batch -> terms

    @property
    def passed(self) -> bool:
        return not errors_in(self.problems)


def source_label(row: ManifestRow) -> str:
    """'batch:<id>' or 'dataset:<version>': where a manifest row's file was copied from."""
    if row.source_batch:
        return f"batch:{row.source_batch}"
    if row.source_dataset:
        return f"dataset:{row.source_dataset}"
    return "unknown"


def _origin(row: ManifestRow) -> str:
    return f"from {source_label(row)}/{row.source_path or '?'}"


def validate_dataset(
    root: DataRoot,
    spec: DatasetSpec,
    snapshot_dir: Path,
    caption_plan: CaptionPlanLike,
    *,
    buckets: Mapping[str, BucketSettings] | None = None,
    workers: int = 2,
    thumbnails: int = 0,
) -> ValidationResult:
    """Run every dataset check on the snapshot `root.dataset(spec.name)`, whose images are written.

    `snapshot_dir` must be that folder: validating some other copy would report on files that
    training never reads. `thumbnails`: the cells of the contact sheet to come, whose thumbnails the one
    decode of each image should keep (inspection.py). An inspection of these files started early
    (`inspection.start_early`, by the command line's build) is taken over. `buckets`: {recipe: its bucket
    settings} of the recipes that train on the version, whose buckets are predicted (none: the defaults).
    """
    if snapshot_dir.resolve() != root.dataset(spec.name).resolve():
        raise UserError(f"not the snapshot folder of '{spec.name}' ({root.dataset(spec.name)})", snapshot_dir)
    info = read_snapshot_info(snapshot_dir)
    version = info.version
    if version != spec.name:
        raise UserError(
            f"snapshot is version '{version}' but the spec is '{spec.name}'", snapshot_dir / SNAPSHOT
        )
    scope = f"dataset:{version}"
    rows = read_manifest(snapshot_dir)
    images = sorted((r for r in rows if r.kind == "image"), key=lambda r: r.path)
    regs = sorted((r for r in rows if r.kind == "reg_image"), key=lambda r: r.path)
    for row in images + regs:
        if not (snapshot_dir / row.path).is_file():
            raise UserError(
                "listed in the manifest but missing; run `lora-pipeline verify`", snapshot_dir / row.path
            )
    paths = [snapshot_dir / r.path for r in images]
    found = take_early(paths, spec.checks.max_pixels, thumbnails)
    if found is None:
        found = inspect_batch(paths, spec.checks.max_pixels, workers, thumbnails)
    infos = {r.path: i for r, i in zip(images, found.infos, strict=True)}
    reg_paths = [snapshot_dir / r.path for r in regs]
    regs_found = inspect_images(reg_paths, spec.checks.max_pixels, workers) if regs else []
    all_infos = {**infos, **{r.path: i for r, i in zip(regs, regs_found, strict=True)}}

    problems: list[Problem] = [*info.problems, *caption_plan.problems]
    for path, image in all_infos.items():
        problems += [problem(path, p.code, p.severity, p.message, scope) for p in image.problems]
        problems += _dimension_problems(path, image, spec, scope)
    masks = {r.path: r.mask for r in images if r.mask}
    for path, mask in masks.items():
        size = (infos[path].width, infos[path].height) if infos[path].decoded and infos[path].width else None
        unusable = mask_problems(snapshot_dir / path, None if mask == ALPHA else snapshot_dir / mask,
                                 mask == ALPHA, size, spec.checks.max_pixels)
        problems += [problem(path, code, "error", message, scope) for code, message in unusable]
    if not images:  # e.g. a spec of regularisation sources only: there would be nothing to learn the concept from
        problems.append(problem("", "no_training_images", "error", "the version has no training images (only "
                                f"{len(regs)} regularisation images): add a source with role: training", scope))
    exact, near, duplicate_problems = _duplicates(images, infos, spec, scope)
    orphans = _orphan_captions(snapshot_dir, rows, images)
    problems += rights_problems(spec, images + regs, scope)
    problems += duplicate_problems + [
        problem(p, "orphan_caption", "warning", "caption file in the snapshot has no image beside it", scope)
        for p in orphans
    ]
    problems.sort(key=lambda p: (SEVERITY_ORDER[p["severity"]], p["scope"], p["file"], p["code"], p["message"]))

    captions = {str(k): v for k, v in caption_plan.captions.items() if v and v.strip()}
    paired = [r for r in images if r.path in captions]
    severities = Counter(p["severity"] for p in problems)
    counts = {
        "images": len(images),
        "captions": len(captions),
        "pairs": len(paired),
        "images_without_caption": len(images) - len(paired),
        "orphan_captions": len(orphans),
        "decodable_images": sum(1 for i in infos.values() if i.decoded),
        "samples_per_epoch": len(paired) * spec.repeats,
        "masked_images": len(masks),
        "regularisation_images": len(regs),
        "by_source": dict(sorted(Counter(source_label(r) for r in images).items())),
        "regularisation_by_folder": dict(sorted(Counter(r.path.rsplit("/", 1)[0] for r in regs).items())),
        "problems": {"error": severities["error"], "warning": severities["warning"]},
        "problems_by_code": dict(sorted(Counter(p["code"] for p in problems).items())),
        "by_rights": rights_counts(image_rights(images + regs)),
    }
    first, *others = bucket_summaries(infos, buckets or {})
    return ValidationResult(
        version=version,
        manifest_root=info.manifest_root,
        scope=scope,
        counts=counts,
        problems=problems,
        buckets=first,
        checks=asdict(spec.checks),
        infos=infos,
        exact_duplicates=exact,
        near_duplicates=near,
        thumbnails={images[i].path: thumb for i, thumb in found.thumbnails.items()},
        masks=masks,
        other_buckets=others,
        rights=image_rights(images + regs),
        rights_by_batch={batch: terms.to_json_dict() for batch, terms in info.rights.items()},
    )


def _dimension_problems(path: str, image: ImageInfo, spec: DatasetSpec, scope: str) -> list[Problem]:
    if not image.width or not image.height:
        return []
    w, h = image.width, image.height
    out = []
    if min(w, h) < spec.checks.min_side:
        msg = (
            f"{w}x{h}: the shorter side {min(w, h)} px is below checks.min_side {spec.checks.min_side} px "
            "(training would upscale it)"
        )
        out.append(problem(path, "too_small", "error", msg, scope))
    aspect = max(w, h) / min(w, h)
    if aspect > spec.checks.max_aspect:
        msg = f"{w}x{h}: aspect ratio {aspect:.2f} exceeds checks.max_aspect {spec.checks.max_aspect:g}"
        out.append(problem(path, "aspect_ratio", "error", msg, scope))
    return out


def bucket_summaries(infos: Mapping[str, ImageInfo], recipes: Mapping[str, BucketSettings]) -> list[dict[str, Any]]:
    """One `bucket_summary` per distinct bucket settings of `recipes` ({recipe: its settings}; first the settings
    of the first recipe by name), each naming its recipes; without recipes, one of the recipe defaults."""
    by_settings: dict[BucketSettings, list[str]] = {}
    for name in sorted(recipes):
        by_settings.setdefault(recipes[name], []).append(name)
    if not by_settings:
        by_settings[DEFAULT_BUCKETS] = []
    return [bucket_summary(infos, settings, names) for settings, names in by_settings.items()]


def bucket_summary(infos: Mapping[str, ImageInfo], settings: BucketSettings, recipes: Sequence[str] = ()
                   ) -> dict[str, Any]:
    """The kohya bucket of every decodable image and the histogram of bucket sizes under `settings`, and the
    `recipes` that train with them (empty: the recipe defaults). Multi-resolution settings (`resolutions`) count
    every image once per side, each histogram row naming its side; `images` holds the buckets of the first side."""
    sizes = {p: (i.width, i.height) for p, i in infos.items() if i.decoded and i.width and i.height}
    by_side = {side: {p: select_bucket(*size, settings.buckets(side)) for p, size in sizes.items()}
               for side in settings.sides}
    multi = bool(settings.resolutions)
    histogram = [{**({"resolution": side} if multi else {}), "width": w, "height": h, "count": n}
                 for side, chosen in by_side.items() for (w, h), n in sorted(Counter(chosen.values()).items())]
    fields = asdict(settings)
    if not multi:  # the reports of single-resolution settings stay as they were
        del fields["resolutions"]
    else:
        fields["resolutions"] = list(settings.resolutions)
    return {
        **fields,
        "recipes": list(recipes),
        "histogram": histogram,
        "images": {p: list(bucket) for p, bucket in by_side[settings.sides[0]].items()},
    }


def _duplicates(
    images: list[ManifestRow], infos: dict[str, ImageInfo], spec: DatasetSpec, scope: str
) -> tuple[list[tuple[str, str]], list[tuple[str, str, int]], list[Problem]]:
    """Exact duplicates (always warnings) and near duplicates (severity from checks.near_duplicates)."""
    by_path = {r.path: r for r in images}
    exact = _exact_duplicates(images)
    problems = [
        problem(
            copy,
            "exact_duplicate",
            "warning",
            f"identical bytes to {first} ({_origin(by_path[first])}); this copy is {_origin(by_path[copy])}",
            scope,
        )
        for copy, first in exact
    ]
    if spec.checks.near_duplicates == "ignore":
        return exact, [], problems
    near = _near_duplicates(images, infos)
    problems += [
        problem(
            copy,
            "near_duplicate",
            SEVERITY_FOR[spec.checks.near_duplicates],
            f"looks like {first} (perceptual hash distance {distance} of 64, {_origin(by_path[first])}); "
            f"this one is {_origin(by_path[copy])}",
            scope,
        )
        for copy, first, distance in near
    ]
    return exact, near, problems


def _exact_duplicates(images: list[ManifestRow]) -> list[tuple[str, str]]:
    """(copy, first) for every image whose sha256 equals an earlier image's (images sorted by path)."""
    first_by_hash: dict[str, str] = {}
    out = []
    for row in images:
        first = first_by_hash.setdefault(row.sha256, row.path)
        if first != row.path:
            out.append((row.path, first))
    return out


def _near_duplicates(images: list[ManifestRow], infos: dict[str, ImageInfo]) -> list[tuple[str, str, int]]:
    """(copy, closest earlier match, distance) for each image that nearly matches an earlier one.

    Pairs with identical bytes are left to the exact-duplicate check. The earliest image of a group
    (by path) is the one kept, so it is never flagged.
    """
    hashed = [r for r in images if infos[r.path].dhash is not None]
    pairs = near_duplicate_pairs(
        [infos[r.path].dhash or 0 for r in hashed],
        [infos[r.path].colour_signature or b"" for r in hashed],
        [r.sha256 for r in hashed],
        NEAR_DUPLICATE_DISTANCE,
        NEAR_DUPLICATE_COLOUR,
    )
    return [(hashed[j].path, hashed[i].path, distance) for j, i, distance in pairs]


def _orphan_captions(snapshot_dir: Path, rows: list[ManifestRow], images: list[ManifestRow]) -> list[str]:
    """Caption files (on disk under img/, or caption rows of the manifest) whose image is not in the snapshot."""
    image_stems = {PurePosixPath(r.path).with_suffix("") for r in images}
    on_disk = {p.relative_to(snapshot_dir).as_posix() for p in (snapshot_dir / "img").rglob("*.txt") if p.is_file()}
    in_manifest = {r.path for r in rows if r.kind == "caption"}
    return sorted(p for p in on_disk | in_manifest if PurePosixPath(p).with_suffix("") not in image_stems)
