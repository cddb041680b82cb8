"""Caption sets: where each snapshot image's caption comes from, and writing it beside the image.

Sources (the spec's `captions.from`) for images copied from a source batch:

- `sidecar`: `<stem>.txt` in the same folder of the batch as the image.
- `table`: a CSV or JSONL file (by extension) inside a batch with columns `file` and `caption`.
- `attributes`: a CSV or JSONL file with `file` plus attribute columns, rendered with `captions.template`
  (str.format placeholders naming columns; `{trigger}` is the spec's trigger).

`captions.table` is "<batch>/<path>", or just "<path>" when the spec names exactly one batch. A table's
`file` is the image's path relative to the batch root, '/'-separated (the manifest's `source_path`); a row
is "#n" in a caption source, the n-th record counting from 1 (a CSV header is not a record). Images
reused from an earlier dataset version always take that version's .txt beside the image.

Every caption is read as UTF-8 (an optional BOM is dropped), normalised (see caption_lint: a multi-line
caption is joined into one line with the separator, because kohya reads only the first line, and warned
about) and linted. Problems with single files are collected so one report lists them all; a table or
spec that cannot be used at all raises UserError. Reading a caption file is caption_files.py's, reading a
table caption_tables.py's; this module gathers the sources into a plan and writes it.

A sidecar or table row is an `orphan_caption` when the image it names does not exist in the batch. An
image that exists but is not in the snapshot was left out on purpose (include/exclude globs), so its
caption is not an orphan.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from lora_pipeline.core.datasets.captions.caption_files import CaptionCollector, snapshot_caption
from lora_pipeline.core.datasets.captions.caption_lint import control_problem, lint_captions
from lora_pipeline.core.datasets.captions.caption_tables import captions_from_table
from lora_pipeline.core.datasets.captions.overrides import override_reads
from lora_pipeline.core.datasets.captions.tags import CAPTION_SUFFIX, caption_path, normalise_caption, place_trigger
from lora_pipeline.core.datasets.problems import Problem, problem
from lora_pipeline.core.datasets.snapshot.manifest import ManifestRow, read_manifest
from lora_pipeline.core.datasets.snapshot.seal import read_seal
from lora_pipeline.core.datasets.sources.batches import IMAGE_EXTENSIONS, spec_batches, walk_files
from lora_pipeline.core.datasets.sources.regular_files import CAPTION_LIMIT, read_regular
from lora_pipeline.core.datasets.spec import DatasetSpec
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_all, read_json, write_json
from lora_pipeline.core.hashing import sha256_bytes
from lora_pipeline.core.paths import CAPTION_CHECK, DataRoot


@dataclass
class CaptionPlan:
    """Everything caption_set needs, computed without writing anything."""

    captions: dict[str, str] = field(default_factory=dict)  # snapshot image path -> final caption text
    # image path -> "sidecar:<batch>/<path>", "table:<batch>/<table>#<n>", "attributes:<batch>/<table>#<n>"
    # or "dataset:<version>/<path of .txt>"
    caption_sources: dict[str, str] = field(default_factory=dict)
    caption_source_sha256: dict[str, str] = field(default_factory=dict)  # sha256 of that sidecar/table file
    problems: list[Problem] = field(default_factory=list)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)  # kohya ss_tag_frequency
    lint: dict[str, Any] = field(default_factory=dict)  # caption_lint stats plus `multiline`


def parse_caption_source(source: str) -> tuple[str, str, str]:
    """("sidecar" | "table" | "attributes" | "dataset", batch or version, path of the file) of a source."""
    kind, _, rest = source.partition(":")
    name, _, path = rest.partition("/")
    if kind in ("table", "attributes"):
        path = path.rpartition("#")[0]
    return kind, name, path


def _from_sidecars(root: DataRoot, images: list[ManifestRow], out: CaptionCollector) -> None:
    claimed: dict[str, set[str]] = defaultdict(set)
    for row in images:
        batch = row.source_batch
        rel = caption_path(row.source_path)
        claimed[batch].add(rel)
        path, source = root.batch(batch) / rel, f"sidecar:{batch}/{rel}"
        out.read_file(row.path, path, rel, f"batch:{batch}", source, f"sidecar {batch}/{rel}")
    for batch in spec_batches(root, out.spec):
        folder = root.batch(batch)
        if not folder.is_dir():
            continue
        files = [PurePosixPath(f.path) for f in walk_files(folder, f"batch:{batch}")[0]]
        image_stems = {p.with_suffix("") for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
        for path in files:
            rel = path.as_posix()
            if path.suffix == CAPTION_SUFFIX and rel not in claimed[batch] and path.with_suffix("") not in image_stems:
                out.orphan(rel, batch, "caption file with no image of the same name beside it")


def _from_datasets(root: DataRoot, images: list[ManifestRow], out: CaptionCollector) -> None:
    for row in images:
        version = row.source_dataset
        rel = caption_path(row.source_path)
        path, source = root.dataset(version) / rel, f"dataset:{version}/{rel}"
        out.read_file(row.path, path, rel, f"dataset:{version}", source, f"{version}/{rel}")


def _stem_collisions(images: list[ManifestRow], out: CaptionCollector) -> set[str]:
    """Images that would share one .txt (a.png and a.jpg in one folder): kohya cannot pair them."""
    by_caption: dict[str, list[str]] = defaultdict(list)
    for row in images:
        by_caption[caption_path(row.path)].append(row.path)
    clashing = set()
    for txt, paths in by_caption.items():
        if len(paths) > 1:
            clashing.update(paths)
            message = f"{' and '.join(sorted(paths))} would share the caption file {txt}"
            out.problems.extend(problem(p, "caption_stem_collision", "error", message, out.scope) for p in paths)
    return clashing


def plan_captions(root: DataRoot, spec: DatasetSpec, snapshot_dir: Path) -> CaptionPlan:
    """Find, normalise and lint the caption of every image in a snapshot's manifest; writes nothing."""
    images = sorted((r for r in read_manifest(snapshot_dir) if r.kind == "image"), key=lambda r: r.path)
    from_batches = [r for r in images if r.source_batch is not None]
    out = CaptionCollector(spec)
    if spec.captions.source == "sidecar":
        _from_sidecars(root, from_batches, out)
    elif from_batches or spec_batches(root, spec):
        captions_from_table(root, from_batches, out)
    _from_datasets(root, [r for r in images if r.source_dataset is not None], out)
    overrides, override_problems = override_reads(root, spec, images)  # reviewed captions layered on top
    out.problems = [p for p in out.problems if not (p["file"] in overrides and p["scope"] == out.scope)]
    out.problems += override_problems
    for image, read in overrides.items():
        out.read_file(image, *read)
    clashing = _stem_collisions(images, out)

    plan = CaptionPlan()
    multiline = 0
    for image, found in sorted(out.found.items()):
        if image in clashing:
            continue
        if (control := control_problem(image, found.text, out.scope)) is not None:
            out.problems.append(control)
        text, was_multiline = normalise_caption(found.text)
        if was_multiline:
            multiline += 1
            message = "the caption has several lines; they were joined with ',' because kohya reads only the first"
            out.problems.append(problem(image, "multiline_caption", "warning", message, out.scope))
        plan.captions[image] = place_trigger(text, spec.trigger) if spec.captions.prepend_trigger else text
        plan.caption_sources[image] = found.source
        plan.caption_source_sha256[image] = found.sha256

    lint_problems, plan.lint, plan.tag_frequency = lint_captions(plan.captions, spec)
    plan.lint["multiline"] = multiline
    for p in lint_problems + out.problems:
        source = plan.caption_sources.get(p["file"]) if p["scope"] == out.scope else None
        plan.problems.append({**p, "message": f"{p['message']} (caption from {source})"} if source else p)
    return plan


def write_captions(snapshot_dir: Path, plan: CaptionPlan) -> list[ManifestRow]:
    """Write each planned caption as a read-only .txt beside its image; return the manifest caption rows.

    A caption file already there with the same content is left alone, so re-running is a no-op. One with
    different content means the snapshot's captions would change: snapshots are immutable, so that is a
    UserError asking for a new dataset version, and so is a caption missing from a sealed version: every
    check comes before the first write.
    """
    rows, new = [], []
    for image, caption in sorted(plan.captions.items()):
        rel = caption_path(image)
        target = snapshot_dir / rel
        data = (caption + "\n").encode("utf-8")
        if not os.path.lexists(target):
            new.append((target, data))
        elif read_regular(target, CAPTION_LIMIT + 1) != data:
            raise UserError("differs from the new caption; snapshots are immutable, make a new dataset version", target)
        source = plan.caption_sources[image]
        kind, name, source_path = parse_caption_source(source)
        rows.append(
            ManifestRow(
                path=rel,
                kind="caption",
                sha256=sha256_bytes(data),
                bytes=len(data),
                image=image,
                caption_source=source,
                **{"source_dataset" if kind == "dataset" else "source_batch": name},
                source_path=source_path,
                source_sha256=plan.caption_source_sha256[image],
            )
        )
    if new and read_seal(snapshot_dir) is not None:
        raise UserError("has no caption in this sealed version; versions are immutable, make a new one", new[0][0])
    atomic_write_all(new, readonly=True)
    return rows


@dataclass
class CaptionCheck:
    """A written caption set as dataset_report validates it: the captions as the snapshot's .txt files hold
    them (what training reads), and what caption_set found while planning them (captions.json)."""

    captions: dict[str, str]  # snapshot image path -> caption text
    problems: list[Problem]
    lint: dict[str, Any]
    tag_frequency: dict[str, dict[str, int]]


def write_caption_check(snapshot_dir: Path, plan: CaptionPlan) -> None:
    """Record the plan's problems, lint stats and tag frequencies in the snapshot (captions.json), so the
    report reads them instead of planning the captions again."""
    found = {"problems": plan.problems, "lint": plan.lint, "tag_frequency": plan.tag_frequency}
    write_json(snapshot_dir / CAPTION_CHECK, found, sort_keys=False)


def load_caption_check(snapshot_dir: Path) -> CaptionCheck:
    """captions.json and the text of every caption file the manifest lists."""
    path = snapshot_dir / CAPTION_CHECK
    if not path.is_file():
        raise UserError("no caption check in the snapshot: materialize caption_set first", path)
    found = read_json(path)
    rows = [row for row in read_manifest(snapshot_dir) if row.kind == "caption"]
    captions = {row.image: snapshot_caption(snapshot_dir / row.path) for row in rows}
    return CaptionCheck(captions, found["problems"], found["lint"], found["tag_frequency"])
