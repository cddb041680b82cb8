"""The seal: a dataset version is whole only once its `seal.json` exists.

A version is made in three Dagster steps: dataset_snapshot renames the copied images, the manifest and
snapshot.json into place (atomically), caption_set adds the captions, their manifest rows and captions.json,
dataset_report adds report.json, report.md, contact_sheet.png and review.html. A crash between the steps leaves a
folder under the final name that is not whole. The last step writes `seal.json` (atomically, read-only):
the sha256 of manifest.jsonl, snapshot.json, captions.json and the four report files, and the manifest root. Every
reader of a version requires the seal (`require_sealed`): another version built from it, the training
gate, `verify`, provenance. A folder without a seal is a build in progress or an interrupted one;
building the version again completes it (the steps before the seal are idempotent).

Because the seal covers the report files, an edited report.json ("passed": true) no longer matches and
is caught by `verify` and by the gate. Rebuilding a sealed version rewrites nothing while the report comes
out the same; should a newer release render it differently, the report files are replaced and sealed
again, and between the two the old seal does not match (the gate refuses, never accepts). The seal is a
record of integrity, not a signature: someone who edits the files and rewrites the seal on purpose is not
stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_pipeline.core.datasets.snapshot.manifest import (
    SEALED_FILES,
    SEALED_IF_PRESENT,
    VerifyResult,
    read_manifest,
    read_snapshot_info,
    verify_snapshot,
)
from lora_pipeline.core.datasets.sources.regular_files import NotRegularFile, sha256_regular
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_text, read_json
from lora_pipeline.core.hashing import sha256_file
from lora_pipeline.core.names import closest_names
from lora_pipeline.core.paths import SEAL, SNAPSHOT, DataRoot


def read_seal(snapshot_dir: Path) -> dict[str, Any] | None:
    """The version's seal, or None while it is not whole."""
    path = snapshot_dir / SEAL
    if not os.path.lexists(path):
        return None
    seal = read_json(path)
    if not isinstance(seal, dict) or not isinstance(seal.get("files"), dict):
        raise UserError("damaged seal (no 'files' record); run `lora-pipeline verify`", path)
    return seal


def not_sealed_error(snapshot_dir: Path) -> UserError:
    version = snapshot_dir.name
    return UserError(
        f"dataset version '{version}' is not sealed: its build has not finished (or was interrupted); "
        f"run `lora-pipeline build {version}` to complete it",
        snapshot_dir,
    )


def require_sealed(snapshot_dir: Path) -> dict[str, Any]:
    """The seal of a whole version; UserError when the version is missing or not sealed."""
    if not (snapshot_dir / SNAPSHOT).is_file():
        raise UserError("dataset version is not built", snapshot_dir)
    seal = read_seal(snapshot_dir)
    if seal is None:
        raise not_sealed_error(snapshot_dir)
    return seal


def changed_sealed_files(snapshot_dir: Path, seal: dict[str, Any]) -> list[str]:
    """The sealed files (manifest, snapshot.json, report files) whose bytes differ from the seal's record."""
    changed = []
    for name, digest in sorted(seal["files"].items()):
        try:
            same = sha256_regular(snapshot_dir / name, beneath=snapshot_dir) == digest
        except (FileNotFoundError, NotRegularFile):
            same = False
        if not same:
            changed.append(name)
    return changed


def _unlisted_files(snapshot_dir: Path, expected: set[str]) -> list[Path]:
    """Files of the version that neither the manifest nor the seal accounts for."""
    return [
        path
        for path in sorted(snapshot_dir.rglob("*"))
        if (path.is_file() or path.is_symlink()) and path.relative_to(snapshot_dir).as_posix() not in expected
    ]


def seal_snapshot(snapshot_dir: Path) -> dict[str, Any]:
    """Seal a version whose captions and report are written: the last step of building it.

    A leftover temporary file of an interrupted atomic write (`.<name>.<random>.tmp`) is removed first;
    any other file that the manifest does not list is refused, so a sealed version holds exactly its
    manifest plus the sealed files. Sealing an unchanged version again writes nothing.
    """
    info = read_snapshot_info(snapshot_dir)
    if not info.captions_complete:
        raise UserError("cannot seal: the captions are not complete (caption_set has not run)", snapshot_dir / SNAPSHOT)
    expected = {r.path for r in read_manifest(snapshot_dir)} | {*SEALED_FILES, SEAL}
    for path in _unlisted_files(snapshot_dir, expected):
        if path.name.startswith(".") and path.name.endswith(".tmp") and not path.is_symlink():
            path.unlink()
        else:
            raise UserError("is not listed in the manifest; a version holds only its own files", path)
    for name in SEALED_FILES:
        if name not in SEALED_IF_PRESENT and not (snapshot_dir / name).is_file():
            raise UserError("cannot seal: file missing", snapshot_dir / name)
    present = [name for name in SEALED_FILES if (snapshot_dir / name).is_file()]
    seal = {
        "version": info.version,
        "manifest_root": info.manifest_root,
        "files": {name: sha256_file(snapshot_dir / name) for name in present},
    }
    atomic_write_text(snapshot_dir / SEAL, json.dumps(seal, indent=2, sort_keys=True) + "\n", readonly=True)
    return seal


def verify_version(snapshot_dir: Path) -> VerifyResult:
    """`verify_snapshot` of a sealed version, including the sealed files; a version without a seal is not
    checked at all (its files may be half written by a running build) and comes back with sealed=False."""
    seal = read_seal(snapshot_dir)
    if seal is None:
        return VerifyResult(version=snapshot_dir.name, manifest_root="", sealed=False)
    result = verify_snapshot(snapshot_dir, seal["files"])
    if seal.get("manifest_root") != result.manifest_root:
        result.root_mismatch = True
    return result


def verify_versions(root: DataRoot, versions: Sequence[str] = ()) -> list[VerifyResult]:
    """`verify_version` of each named dataset version, or of every built one when none is named."""
    for version in versions:
        if not (root.dataset(version) / SNAPSHOT).is_file():
            hint = closest_names(version, root.built_versions())
            raise UserError(f"no such dataset version (not built){hint}", root.dataset(version))
    return [verify_version(root.dataset(version)) for version in versions or root.built_versions()]
