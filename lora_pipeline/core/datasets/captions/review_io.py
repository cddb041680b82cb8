"""`lora-pipeline captions export` and `captions import`: captions reviewed by people, copy-only.

Export writes a CSV (one row per training image of a sealed version: `version`, `image`, `caption`, `source`,
`findings`, `thumbnail`) and a folder of small JPEG thumbnails beside it (`<csv stem>-thumbs/`, the `thumbnail`
column is a path relative to the CSV). A person edits the `caption` column in any spreadsheet.

Import reads the edited CSV back. Rows are numbered as a spreadsheet shows them (the header is row 1). A row
whose image is not in the version, a second row for one image, a caption without the trigger first or with
an error of the spec's caption lint (a banned word, no tag besides the trigger) is refused in one line naming
the row; nothing is written then (lint warnings, such as out-of-vocabulary words, show in the new version's
report as they would for any caption). The edited captions, and only they, land as a new
caption batch `sources/<id>/` of sidecars laid out by each image's origin (see overrides.py), built in a
staging folder and renamed into place with `_READY` inside; the version's source batches are only read. A new
spec, the next free version of the family, copies the old one and adds `batch:<id>` to `captions.overrides`, so
building it gives a version whose captions differ from the old one's in exactly the edited rows.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path

import yaml
from PIL import Image, ImageOps

from lora_pipeline.core.datasets.captions.caption_files import snapshot_caption
from lora_pipeline.core.datasets.captions.caption_lint import lint_captions
from lora_pipeline.core.datasets.captions.overrides import origin_sidecar
from lora_pipeline.core.datasets.captions.review import THUMBNAIL_PX, ReviewRow, review_rows
from lora_pipeline.core.datasets.captions.tags import is_trigger, normalise_caption, split_tags
from lora_pipeline.core.datasets.problems import errors_in
from lora_pipeline.core.datasets.snapshot.manifest import read_manifest
from lora_pipeline.core.datasets.snapshot.seal import require_sealed
from lora_pipeline.core.datasets.snapshot.snapshot_plan import next_free_version
from lora_pipeline.core.datasets.sources.copying import fsync_dir
from lora_pipeline.core.datasets.sources.staging import remove_abandoned, staging_folder
from lora_pipeline.core.datasets.spec import DatasetSpec, load_spec
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_text, read_json
from lora_pipeline.core.names import require_name
from lora_pipeline.core.paths import READY_MARKER, REPORT_JSON, DataRoot, require_new_batch_id
from lora_pipeline.core.yamlfile import load_yaml_mapping

COLUMNS = ("version", "image", "caption", "source", "findings", "thumbnail")
CSV_LIMIT = 64 * 1024 * 1024


@dataclass(frozen=True)
class ExportResult:
    csv: Path
    thumbnails: Path
    rows: int


def _version_rows(root: DataRoot, version: str) -> list[ReviewRow]:
    snapshot_dir = root.dataset(version)
    require_sealed(snapshot_dir)
    captions = {
        r.image: snapshot_caption(snapshot_dir / r.path)
        for r in read_manifest(snapshot_dir)
        if r.kind == "caption" and r.image
    }
    # report.json read as data: the report module (checks) writes the review page, so captions does not import it
    return review_rows(snapshot_dir, captions, read_json(snapshot_dir / REPORT_JSON).get("problems", []))


def _thumbnail(source: Path, target: Path) -> None:
    with Image.open(source) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        im.save(target, "JPEG", quality=85)


def export_captions(root: DataRoot, version: str, to: Path) -> ExportResult:
    """Write the review CSV of a sealed version to `to`, thumbnails beside it; never over an existing file (it may
    hold someone's edits)."""
    rows = _version_rows(root, version)
    to = to.resolve()
    thumbs = to.with_name(f"{to.stem}-thumbs")
    for path in (to, thumbs):
        if os.path.lexists(path):
            raise UserError("already exists; an export never overwrites (it may hold edits): choose another --to", path)
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    to.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(to.parent, thumbs.name) as staging:
        for row in rows:
            rel = f"{row.image}.jpg"
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            _thumbnail(root.dataset(version) / row.image, staging / rel)
            findings = "; ".join(f"{p['severity']} {p['code']}: {p['message']}" for p in row.findings)
            writer.writerow([version, row.image, row.caption, row.source, findings, f"{thumbs.name}/{rel}"])
        os.rename(staging, thumbs)
    atomic_write_text(to, out.getvalue())
    return ExportResult(to, thumbs, len(rows))


@dataclass(frozen=True)
class ImportResult:
    batch: str
    dir: Path
    version: str
    new_version: str
    spec: Path
    edited: list[str]  # snapshot image paths whose caption changed


def _read_csv(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(spreadsheet row number, row) of each data row; UserError for what is not a review CSV."""
    if not path.is_file():
        raise UserError("caption CSV not found", path)
    if path.stat().st_size > CSV_LIMIT:
        raise UserError(f"larger than {CSV_LIMIT:,} bytes; not a caption review CSV", path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"not UTF-8 text (offset {exc.start}); save the CSV as UTF-8", path) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        missing = [c for c in ("version", "image", "caption") if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(
                f"no column {', '.join(missing)} (export the CSV with `lora-pipeline captions export`)", path
            )
        return [(n, {k: v or "" for k, v in row.items() if k is not None}) for n, row in enumerate(reader, 2)]
    except csv.Error as exc:
        raise UserError(f"not valid CSV at line {reader.line_num}: {exc}", path) from None


def _edited_captions(
    root: DataRoot, path: Path, version: str, rows: list[tuple[int, dict[str, str]]]
) -> tuple[dict[str, str], dict[str, str]]:
    """({image: current caption}, {image: edited caption}) of a review CSV's rows; UserError naming the row of
    the first unknown, repeated or unusable row."""
    current = {r.image: r.caption for r in _version_rows(root, version)}
    seen: dict[str, int] = {}
    edited: dict[str, str] = {}
    for n, row in rows:
        image = row["image"].strip()
        if row["version"].strip() != version:
            raise UserError(f"row {n}: version '{row['version']}' is not '{version}' (one version per CSV)", path)
        if image not in current:
            raise UserError(f"row {n}: image '{image}' is not an image of version '{version}'", path)
        if image in seen:
            raise UserError(f"row {n}: image '{image}' already has row {seen[image]}", path)
        seen[image] = n
        caption, _ = normalise_caption(row["caption"])
        if caption != current[image]:
            edited[image] = caption
    return current, edited


def _check_edits(
    path: Path, spec: DatasetSpec, rows: dict[str, int], captions: dict[str, str], edited: set[str]
) -> None:
    """The spec's caption lint over the version's captions with the edits; an error in an edited caption (or a
    caption whose first tag is not the trigger) is refused naming its row."""
    for image in sorted(edited, key=rows.__getitem__):
        tags = split_tags(captions[image])
        if not tags or not is_trigger(tags[0], spec.trigger):
            raise UserError(f"row {rows[image]}: the caption must start with the trigger '{spec.trigger}'", path)
    problems, _, _ = lint_captions(captions, spec)
    for p in sorted(errors_in(problems), key=lambda p: rows.get(p["file"], 0)):
        if p["file"] in edited:
            raise UserError(f"row {rows[p['file']]}: {p['code']}: {p['message']}", path)


def _write_spec(root: DataRoot, version: str, batch: str) -> tuple[str, Path]:
    """The next free version of the family: the old spec with `batch:<batch>` added to captions.overrides."""
    data = load_yaml_mapping(root.spec_file(version))
    new_version = next_free_version(root, version)
    captions = dict(data.get("captions") or {})
    before = captions.get("overrides") or []
    captions["overrides"] = [*([before] if isinstance(before, str) else before), f"batch:{batch}"]
    data.update(name=new_version, intent=f"caption review {batch} over {version}", captions=captions)
    path = root.spec_file(new_version)
    with open(path, "x", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True)
    return new_version, path


def import_captions(root: DataRoot, csv_path: Path, batch: str) -> ImportResult:
    """Land the edited captions of a review CSV as caption batch `batch` and write the spec that layers it."""
    require_new_batch_id(batch)
    target = root.batch(batch)
    if os.path.lexists(target):
        raise UserError("batch already exists; batches are never overwritten — use a new batch id", target)
    rows = _read_csv(csv_path)
    if not rows:
        raise UserError("holds no rows", csv_path)
    version = require_name(rows[0][1]["version"].strip(), f"{csv_path}: row 2: version")
    spec = load_spec(root.spec_file(version))
    globs = [s.batch for s in spec.sources if s.is_pattern and s.batch and fnmatchcase(batch, s.batch)]
    if globs:
        raise UserError(
            f"batch id '{batch}' matches the source glob '{globs[0]}' of {version}; choose another id",
            root.spec_file(version),
        )
    current, edited = _edited_captions(root, csv_path, version, rows)
    if not edited:
        raise UserError(f"no caption differs from version '{version}'; nothing to import", csv_path)
    numbers = {row["image"].strip(): n for n, row in rows}
    _check_edits(csv_path, spec, numbers, current | edited, set(edited))
    by_image = {r.path: r for r in read_manifest(root.dataset(version)) if r.kind == "image"}
    remove_abandoned(root.sources)
    with staging_folder(root.sources, batch) as staging:
        for image, caption in sorted(edited.items()):
            sidecar = staging / origin_sidecar(by_image[image])
            sidecar.parent.mkdir(parents=True, exist_ok=True)
            sidecar.write_text(caption + "\n", encoding="utf-8")
        marker = {
            "batch": batch,
            "captions_of": version,
            "edited": len(edited),
            "from_csv": csv_path.name,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        atomic_write_text(staging / READY_MARKER, json.dumps(marker, sort_keys=True) + "\n", readonly=True)
        if os.path.lexists(target):
            raise UserError("batch appeared while writing; not overwriting it", target)
        os.rename(staging, target)
    fsync_dir(root.sources)
    new_version, spec_path = _write_spec(root, version, batch)
    return ImportResult(batch, target, version, new_version, spec_path, sorted(edited))
