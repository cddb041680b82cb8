"""`manifest.jsonl` and `snapshot.json`: reading, writing atomically, and re-verifying.

A manifest row describes one file of a snapshot, path relative to the snapshot folder:

    {"path": "img/10_hdaesth/a.png", "kind": "image", "sha256": ..., "bytes": ...,
     "width": 1024, "height": 768, "stored_width": 1024, "stored_height": 768,
     "source_batch": "curated-2026-10",                                      # or "source_dataset"
     "source_path": "views/a.png", "source_sha256": ...}
    {"path": "img/10_hdaesth/a.txt", "kind": "caption", "sha256": ..., "bytes": ...,
     "image": "img/10_hdaesth/a.png", "caption_source": "sidecar:curated-2026-10/views/a.txt",
     "source_batch": ..., "source_path": ..., "source_sha256": ...}

`manifest_root` in snapshot.json is the Merkle root over every row (images and captions);
`image_root` is the root over the image rows alone, fixed when the images are copied. `width` and
`height` are the size training sees (after EXIF orientation); `stored_width`/`stored_height` are the size
stored in the file (they differ for a picture that EXIF turns by 90 degrees).

Rows are `ManifestRow`s and snapshot.json a `SnapshotInfo` (records: see schema.Record); a row holds the keys
it was written with and no others, so manifest.jsonl, read and written again, is the same bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from lora_pipeline.core.datasets.problems import Problem
from lora_pipeline.core.datasets.sources.hashcache import ImageSize
from lora_pipeline.core.datasets.sources.regular_files import NotRegularFile, irregular_entries, sha256_regular
from lora_pipeline.core.datasets.sources.rights import BatchRights
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_text, write_json
from lora_pipeline.core.hashing import merkle_root
from lora_pipeline.core.paths import (
    CAPTION_CHECK,
    CONTACT_SHEET,
    MANIFEST,
    REPORT_JSON,
    REPORT_MD,
    REVIEW_PAGE,
    SEAL,
    SNAPSHOT,
)
from lora_pipeline.core.schema import Record, error_line

# Files the pipeline writes into a snapshot besides the manifest's own rows; the seal records their sha256.
SEALED_FILES = (MANIFEST, SNAPSHOT, CAPTION_CHECK, REPORT_JSON, REPORT_MD, CONTACT_SHEET, REVIEW_PAGE)
# Sealed when present: every build writes the review page, but a snapshot written by hand (or by hand-made
# tools) may go without it.
SEALED_IF_PRESENT = (REVIEW_PAGE,)
NON_CONTENT = {*SEALED_FILES, SEAL}

RowKind = Literal["image", "reg_image", "caption", "reg_caption", "mask"]
IMAGE_KINDS = ("image", "reg_image")


class ManifestRow(Record):
    """One file of a snapshot (a line of manifest.jsonl). An image row (`image`, `reg_image`) has its sizes, its
    source and origin and, with a loss mask, `mask`; a caption or mask row names its `image`; a caption row says
    where its text came from (`caption_source`). A regularisation caption has no source file."""

    path: str  # relative to the snapshot folder
    kind: RowKind
    sha256: str
    bytes: int
    width: int | None = None  # as training sees it; null when the header could not be read
    height: int | None = None
    stored_width: int | None = None  # as the file stores it; absent in rows written before EXIF orientation
    stored_height: int | None = None
    source_batch: str | None = None  # the batch the file was copied from (or:)
    source_dataset: str | None = None  # the earlier dataset version it was copied from
    source_path: str | None = None  # relative to that batch or version
    source_sha256: str | None = None
    origin_batch: str | None = None  # an image's first source: the batch it entered the pipeline from
    origin_path: str | None = None
    origin_sha256: str | None = None
    renamed_from: str | None = None  # the source's basename, when a name collision renamed the copy
    image: str | None = None  # a caption's or mask's image
    caption_source: str | None = None  # "sidecar:<batch>/<path>", "table:...#<n>", "class_tokens:<class>", ...
    mask: str | None = None  # an image's mask: the mask row's path, or "alpha"
    rights: str | None = None  # an image's origin batch's rights when built, if it had a record (else unknown)

    @property
    def recorded_size(self) -> ImageSize | None:
        """The image's sizes as recorded; None for a row written before stored sizes were recorded."""
        if "stored_width" not in self.model_fields_set:
            return None
        return ImageSize(self.width, self.height, self.stored_width, self.stored_height)


class SourceFingerprint(Record):
    """One source of a snapshot in snapshot.json: its Merkle root over the files taken from it."""

    kind: Literal["batch", "dataset"]
    name: str
    fingerprint: str


class SnapshotInfo(Record):
    """snapshot.json: what a version was built from, its manifest root and whether its captions are complete.
    `build_snapshot` writes every field; snapshots written by hand (tests) or by older builds may hold fewer."""

    version: str
    manifest_root: str  # over every row; moves from the image root to the full root when captions are recorded
    spec: dict[str, Any] = {}  # the spec as resolved
    spec_sha256: str | None = None
    image_root: str | None = None  # over the image rows alone, fixed when the images are copied
    parents: list[str] = []  # the version it was rebuilt from (spec `rebuilt_from`), then those it takes images from
    sources: list[SourceFingerprint] = []
    sources_fingerprint: str | None = None  # over every source file: an unchanged rebuild compares it
    code_version: str | None = None
    created_at: str | None = None
    problems: list[Problem] = []  # found while scanning the sources
    captions_complete: bool = False
    rights: dict[str, BatchRights] = {}  # {origin batch with a rights record: its rights when built}


def manifest_root(rows: Iterable[ManifestRow]) -> str:
    """The Merkle root over the rows (hashing.merkle_root, whose leaves are each row's path, sha256 and bytes)."""
    return merkle_root({"path": row.path, "sha256": row.sha256, "bytes": row.bytes} for row in rows)


def write_manifest(snapshot_dir: Path, rows: Iterable[ManifestRow | Mapping[str, Any]]) -> str:
    """Write manifest.jsonl sorted by path; return the Merkle root of the rows. Rows given as plain data (a
    hand-built snapshot) are checked as `ManifestRow`s first."""
    checked = [row if isinstance(row, ManifestRow) else ManifestRow.model_validate(row) for row in rows]
    ordered = [row.to_json_dict() for row in sorted(checked, key=lambda r: r.path)]
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in ordered)
    atomic_write_text(snapshot_dir / MANIFEST, text, readonly=True)
    return merkle_root(ordered)


def read_manifest(snapshot_dir: Path) -> list[ManifestRow]:
    """The rows of manifest.jsonl, each checked. A line that is not JSON is named before a line that is JSON but
    not a manifest row (an unknown key, a missing field, a wrong type); either is a one-line UserError."""
    path = snapshot_dir / MANIFEST
    if not path.is_file():
        raise UserError("no manifest: the snapshot is missing or incomplete", path)
    rows, not_rows = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(ManifestRow.model_validate_json(line))
            except ValidationError as exc:
                if exc.errors()[0]["type"] == "json_invalid":
                    raise UserError(f"line {lineno} is not valid JSON", path) from None
                not_rows.append(f"line {lineno}: {error_line(exc)}")
    if not_rows:
        raise UserError(not_rows[0], path)
    return rows


def read_snapshot_info(snapshot_dir: Path) -> SnapshotInfo:
    return SnapshotInfo.read(snapshot_dir / SNAPSHOT)


def write_snapshot_info(snapshot_dir: Path, info: SnapshotInfo) -> None:
    write_json(snapshot_dir / SNAPSHOT, info.to_json_dict(), readonly=True)


@dataclass
class VerifyResult:
    version: str
    manifest_root: str
    files_checked: int = 0
    mismatched: list[str] = field(default_factory=list)  # content changed (a flipped byte)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    irregular: list[str] = field(default_factory=list)  # links, FIFOs, devices, empty folders: never read
    root_mismatch: bool = False  # manifest rows no longer hash to snapshot.json's root
    sealed: bool = True  # False: the version is not whole yet, and nothing was checked (see seal.py)

    @property
    def ok(self) -> bool:
        return self.sealed and not (self.mismatched or self.missing or self.extra or self.irregular
                                    or self.root_mismatch)

    def problems(self) -> list[str]:
        if not self.sealed:
            return [
                f"{self.version}: not sealed yet (being built, or its build was interrupted, or its seal was "
                f"removed: run `lora-pipeline build {self.version}`); not verified"
            ]
        out = [
            f"{self.version}/{p}: content changed (sha256 differs from {'seal' if p in SEALED_FILES else 'manifest'})"
            for p in self.mismatched
        ]
        out += [f"{self.version}/{p}: missing" for p in self.missing]
        out += [f"{self.version}/{p}: extra file not in manifest" for p in self.extra]
        out += [f"{self.version}/{p}: not a regular file (a link, FIFO or device) or an empty folder; not read"
                for p in self.irregular]
        if self.root_mismatch:
            out.append(f"{self.version}/{MANIFEST}: rows do not match manifest_root in {SNAPSHOT}")
        return out


def verify_snapshot(snapshot_dir: Path, sealed_files: Mapping[str, str] | None = None) -> VerifyResult:
    """Re-hash every file of a snapshot and compare with its manifest and root, and the files named in
    `sealed_files` ({name: sha256}, the seal's record of report and metadata files) with their hashes."""
    info = read_snapshot_info(snapshot_dir)
    rows = read_manifest(snapshot_dir)
    result = VerifyResult(version=snapshot_dir.name, manifest_root=info.manifest_root)
    result.root_mismatch = manifest_root(rows) != info.manifest_root
    expected = {r.path: r for r in rows}
    for rel, row in sorted(expected.items()):
        digest = _rehash(snapshot_dir, rel, result)
        if digest is not None and digest != row.sha256:
            result.mismatched.append(rel)
    for name, digest in sorted((sealed_files or {}).items()):
        current = _rehash(snapshot_dir, name, result)
        if current is not None and current != digest:
            result.mismatched.append(name)
    for parent, _, files in os.walk(snapshot_dir):  # never enters a linked folder
        for name in files:
            rel = (Path(parent) / name).relative_to(snapshot_dir).as_posix()
            if rel not in expected and rel not in NON_CONTENT and (Path(parent) / name).is_file():
                result.extra.append(rel)
    result.irregular = irregular_in(snapshot_dir, info, expected)
    return result


def irregular_in(snapshot_dir: Path, info: SnapshotInfo, listed: Iterable[str]) -> list[str]:
    """The links, FIFOs, devices and empty folders in a version that its manifest does not list; the spec's own
    class folder, which the build makes even when every image goes to another folder, may be empty."""
    made = snapshot_dir / f"img/{info.spec.get('repeats')}_{info.spec.get('trigger')}"
    allowed = set(listed) | ({made.relative_to(snapshot_dir).as_posix()} if not os.path.islink(made) else set())
    return [rel for rel in irregular_entries(snapshot_dir) if rel not in allowed]


def _rehash(snapshot_dir: Path, rel: str, result: VerifyResult) -> str | None:
    """The sha256 of one listed file, read without following a link on the way down; None (and the file listed
    as missing) when it cannot be read as a regular file of the version."""
    try:
        digest = sha256_regular(snapshot_dir / rel, beneath=snapshot_dir)
    except (FileNotFoundError, NotADirectoryError, NotRegularFile):
        result.missing.append(rel)
        return None
    result.files_checked += 1
    return digest


def record_captions(snapshot_dir: Path, caption_rows: list[ManifestRow]) -> str:
    """Add the caption rows to the manifest once and mark the captions complete; return the new manifest root.

    The images were fixed when the snapshot was copied; captions complete it. Recording the same
    captions again is a no-op; different captions for a sealed snapshot are refused, because a
    dataset version never changes after it is complete.
    """
    info = read_snapshot_info(snapshot_dir)
    image_rows = [r for r in read_manifest(snapshot_dir) if r.kind != "caption"]
    rows = image_rows + list(caption_rows)
    root = manifest_root(rows)
    if info.captions_complete:
        if root != info.manifest_root:
            raise UserError(
                f"dataset version '{info.version}' is complete and its captions would change; "
                "versions are immutable — name a new version",
                snapshot_dir / SNAPSHOT,
            )
        return root
    write_manifest(snapshot_dir, rows)
    write_snapshot_info(snapshot_dir, info.model_copy(update={"manifest_root": root, "captions_complete": True}))
    return root
