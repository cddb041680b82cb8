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
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_text, read_json, write_json
from lora_pipeline.core.hashing import merkle_root, sha256_file
from lora_pipeline.core.paths import CAPTION_CHECK, CONTACT_SHEET, MANIFEST, REPORT_JSON, REPORT_MD, SEAL, SNAPSHOT

# Files the pipeline writes into a snapshot besides the manifest's own rows; the seal records their sha256.
SEALED_FILES = (MANIFEST, SNAPSHOT, CAPTION_CHECK, REPORT_JSON, REPORT_MD, CONTACT_SHEET)
NON_CONTENT = {*SEALED_FILES, SEAL}


def write_manifest(snapshot_dir: Path, rows: Iterable[dict[str, Any]]) -> str:
    """Write manifest.jsonl sorted by path; return the Merkle root of the rows."""
    ordered = sorted(rows, key=lambda r: r["path"])
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in ordered)
    atomic_write_text(snapshot_dir / MANIFEST, text, readonly=True)
    return merkle_root(ordered)


def read_manifest(snapshot_dir: Path) -> list[dict[str, Any]]:
    path = snapshot_dir / MANIFEST
    if not path.is_file():
        raise UserError("no manifest: the snapshot is missing or incomplete", path)
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise UserError(f"line {lineno} is not valid JSON", path) from None
    return rows


def read_snapshot_info(snapshot_dir: Path) -> dict[str, Any]:
    return read_json(snapshot_dir / SNAPSHOT)


@dataclass
class VerifyResult:
    version: str
    manifest_root: str
    files_checked: int = 0
    mismatched: list[str] = field(default_factory=list)  # content changed (a flipped byte)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    root_mismatch: bool = False  # manifest rows no longer hash to snapshot.json's root
    sealed: bool = True  # False: the version is not whole yet, and nothing was checked (see seal.py)

    @property
    def ok(self) -> bool:
        return self.sealed and not (self.mismatched or self.missing or self.extra or self.root_mismatch)

    def problems(self) -> list[str]:
        if not self.sealed:
            return [
                f"{self.version}: not sealed yet (being built, or its build was interrupted: "
                f"run `lora-pipeline build {self.version}`); not verified"
            ]
        out = [
            f"{self.version}/{p}: content changed (sha256 differs from {'seal' if p in SEALED_FILES else 'manifest'})"
            for p in self.mismatched
        ]
        out += [f"{self.version}/{p}: missing" for p in self.missing]
        out += [f"{self.version}/{p}: extra file not in manifest" for p in self.extra]
        if self.root_mismatch:
            out.append(f"{self.version}/{MANIFEST}: rows do not match manifest_root in {SNAPSHOT}")
        return out


def verify_snapshot(snapshot_dir: Path, sealed_files: Mapping[str, str] | None = None) -> VerifyResult:
    """Re-hash every file of a snapshot and compare with its manifest and root, and the files named in
    `sealed_files` ({name: sha256}, the seal's record of report and metadata files) with their hashes."""
    info = read_snapshot_info(snapshot_dir)
    rows = read_manifest(snapshot_dir)
    result = VerifyResult(version=snapshot_dir.name, manifest_root=info.get("manifest_root", ""))
    result.root_mismatch = merkle_root(rows) != info.get("manifest_root")
    expected = {r["path"]: r for r in rows}
    for rel, row in sorted(expected.items()):
        path = snapshot_dir / rel
        if not path.is_file() or path.is_symlink():
            result.missing.append(rel)
            continue
        result.files_checked += 1
        if path.stat().st_size != row["bytes"] or sha256_file(path) != row["sha256"]:
            result.mismatched.append(rel)
    for name, digest in sorted((sealed_files or {}).items()):
        path = snapshot_dir / name
        if not path.is_file() or path.is_symlink():
            result.missing.append(name)
            continue
        result.files_checked += 1
        if sha256_file(path) != digest:
            result.mismatched.append(name)
    for path in sorted(snapshot_dir.rglob("*")):
        rel = path.relative_to(snapshot_dir).as_posix()
        if (path.is_file() or path.is_symlink()) and rel not in expected and rel not in NON_CONTENT:
            result.extra.append(rel)
    return result


def record_captions(snapshot_dir: Path, caption_rows: list[dict[str, Any]]) -> str:
    """Add the caption rows to the manifest once and mark the captions complete; return the new manifest root.

    The images were fixed when the snapshot was copied; captions complete it. Recording the same
    captions again is a no-op; different captions for a sealed snapshot are refused, because a
    dataset version never changes after it is complete.
    """
    info = read_snapshot_info(snapshot_dir)
    image_rows = [r for r in read_manifest(snapshot_dir) if r.get("kind") != "caption"]
    rows = image_rows + list(caption_rows)
    root = merkle_root(rows)
    if info.get("captions_complete"):
        if root != info.get("manifest_root"):
            raise UserError(
                f"dataset version '{info['version']}' is complete and its captions would change; "
                "versions are immutable — name a new version",
                snapshot_dir / SNAPSHOT,
            )
        return root
    write_manifest(snapshot_dir, rows)
    write_json(snapshot_dir / SNAPSHOT, {**info, "manifest_root": root, "captions_complete": True}, readonly=True)
    return root
