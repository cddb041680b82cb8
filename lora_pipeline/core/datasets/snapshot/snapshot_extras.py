"""A snapshot's files besides its training images: loss masks (masks.py) and regularisation images.

Planning: a batch's `<stem>.mask.png` files are paired with the images beside them (`pair_masks`). Building:
after the images are copied, `add_extras` copies each mask beside its image (hashing it) and writes each
regularisation image's caption (its source's `class_tokens`, kohya's caption for a class image without a
caption file), and adds their manifest rows:

    {"path": "img/10_hdaesth/a.mask.png", "kind": "mask", "image": "img/10_hdaesth/a.png", "sha256": ...,
     "bytes": ..., "source_batch": ..., "source_path": "a.mask.png", "source_sha256": ...}
    {"path": "reg/1_appliance/r.png", "kind": "reg_image", ...the fields of an image row...}
    {"path": "reg/1_appliance/r.txt", "kind": "reg_caption", "image": "reg/1_appliance/r.png", "sha256": ...,
     "bytes": ..., "caption_source": "class_tokens:appliance"}

An image row with a mask names it: `"mask": "<path of the mask row>"`, or `"mask": "alpha"`.
"""

from __future__ import annotations

import posixpath
from dataclasses import replace
from pathlib import Path
from typing import Any

from lora_pipeline.core.datasets.masks import ALPHA, MASK_SUFFIX, is_mask, mask_path_for
from lora_pipeline.core.datasets.problems import Problem, problem
from lora_pipeline.core.datasets.snapshot.manifest import ManifestRow
from lora_pipeline.core.datasets.snapshot.snapshot_plan import PlannedFile
from lora_pipeline.core.datasets.sources.batches import BatchFile, is_image
from lora_pipeline.core.datasets.sources.copying import copy_file
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_bytes
from lora_pipeline.core.hashing import sha256_bytes, sha256_file

REG_CAPTION_SOURCE = "class_tokens:"


def pair_masks(files: list[BatchFile], wanted: bool, scope: str) -> tuple[dict[str, BatchFile], list[Problem]]:
    """{image stem path: its mask file} of a batch, and warnings for masks that pair with nothing or that the
    source did not ask for (`wanted`: its `masks: file`)."""
    images = {posixpath.splitext(f.path)[0] for f in files if is_image(f.path) and not is_mask(f.path)}
    masks: dict[str, BatchFile] = {}
    problems = []
    for f in files:
        if not is_mask(f.path):
            continue
        stem = f.path[: -len(MASK_SUFFIX)]
        if not wanted:
            problems.append(problem(f.path, "mask_ignored", "warning",
                                    "a mask file, but the source does not say masks: file; not copied", scope))
        elif stem not in images:
            problems.append(problem(f.path, "orphan_mask", "warning", "mask file with no image beside it", scope))
        else:
            masks[stem] = f
    return masks, problems


def with_mask(planned: PlannedFile, mode: str, masks: dict[str, BatchFile], scope: str) -> tuple[PlannedFile,
                                                                                                 list[Problem]]:
    """A batch image planned with its mask; a `mask_missing` error when the source asks for mask files."""
    if mode == ALPHA:
        return replace(planned, mask=ALPHA), []
    if mode != "file":
        return planned, []
    found = masks.get(posixpath.splitext(planned.source_path)[0])
    if found is None:
        message = f"the source says masks: file but there is no {MASK_SUFFIX} beside the image"
        return planned, [problem(planned.source_path, "mask_missing", "error", message, scope)]
    return replace(planned, mask="file", mask_src=found.abs, mask_source_path=found.path), []


def mask_fingerprint_rows(files: list[PlannedFile], shas: list[str | None]) -> list[dict[str, Any]]:
    """Fingerprint entries of the planned mask files (`shas`: each file's mask sha256, None without one)."""
    return [
        {"path": f"{f.source_kind}:{f.source_name}/{f.mask_source_path}", "sha256": sha,
         "bytes": f.mask_src.stat().st_size if f.mask_src else 0}
        for f, sha in zip(files, shas, strict=True) if sha is not None
    ]


def current_mask_hashes(files: list[PlannedFile]) -> list[str | None]:
    return [None if f.mask_src is None else f.mask_sha256 or sha256_file(f.mask_src) for f in files]


def add_extras(files: list[PlannedFile], rows: list[ManifestRow],
               staging: Path) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """Copy masks and write regularisation captions into `staging`; return the image rows marked (kind, mask)
    and the new rows."""
    marked, extra = [], []
    for f, row in zip(files, rows, strict=True):
        marks: dict[str, Any] = {}
        if f.is_reg:
            marks["kind"] = "reg_image"
            rel = posixpath.splitext(f.dest)[0] + ".txt"
            data = (f"{f.class_tokens}\n").encode()
            atomic_write_bytes(staging / rel, data, readonly=True)
            extra.append(ManifestRow(path=rel, kind="reg_caption", image=f.dest, sha256=sha256_bytes(data),
                                     bytes=len(data), caption_source=f"{REG_CAPTION_SOURCE}{f.class_tokens}"))
        if f.mask == ALPHA:
            marks["mask"] = ALPHA
        elif f.mask == "file" and f.mask_src is not None:
            rel = mask_path_for(f.dest)
            try:
                copied = copy_file(f.mask_src, staging / rel)
            except FileNotFoundError:
                raise UserError(f"mask vanished during the build ({f.source_kind} '{f.source_name}')",
                                f.mask_src) from None
            if f.mask_sha256 is not None and copied.sha256 != f.mask_sha256:
                raise UserError(f"no longer matches the manifest of dataset '{f.source_name}'; "
                                f"run `lora-pipeline verify {f.source_name}`", f.mask_src)
            marks["mask"] = rel
            extra.append(ManifestRow(path=rel, kind="mask", image=f.dest, sha256=copied.sha256, bytes=copied.bytes,
                                     **{f"source_{f.source_kind}": f.source_name},
                                     source_path=f.mask_source_path, source_sha256=copied.sha256))
        marked.append(row.model_copy(update=marks) if marks else row)
    return marked, extra
