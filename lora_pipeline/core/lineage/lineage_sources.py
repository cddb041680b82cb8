"""What the lineage index is derived from, and how it finds out what changed (lineage_index.py keeps the rows).

The sources are a sealed version's seal.json (its rows are read from snapshot.json, manifest.jsonl and
report.json beside it), each LoRA file under loras/<version>/<recipe>/ (its safetensors header) and each
evals/<version>/<recipe>/recommendation.json. A source is named by its path relative to the data root (`src`) and
known by its stamp: size, mtime and inode, as git's index knows a file.
"""

from __future__ import annotations

import collections
import fnmatch
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_pipeline.core.datasets.problems import errors_in
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import read_json
from lora_pipeline.core.names import is_name, require_name
from lora_pipeline.core.paths import REPORT_JSON, SEAL, DataRoot

KEY = "lora_pipeline."
RECOMMENDATION = "recommendation.json"
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
# What a scope reads: (prefix under the data root, glob below it). Everything, one version, one version x recipe.
EVERYTHING = (("datasets/", f"*/{SEAL}"), ("loras/", "*/*/*.safetensors"), ("evals/", f"*/*/{RECOMMENDATION}"))


def scope_of(version: str | None, recipe: str | None) -> tuple[tuple[str, str], ...]:
    """The files of everything (no version), of one version (its seal) or of one version x recipe."""
    if version is None:
        return EVERYTHING
    require_name(version, "dataset version")
    if recipe is None:
        return ((f"datasets/{version}/", SEAL),)
    require_name(recipe, "recipe")
    return ((f"loras/{version}/{recipe}/", "*.safetensors"), (f"evals/{version}/{recipe}/", RECOMMENDATION))


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def scan(root: DataRoot, scope: Sequence[tuple[str, str]]) -> dict[str, str]:
    """{src: stamp} of the files in scope now. One directory read per folder and one stat per file (os.scandir):
    every query pays for this. Folders that are not names (staging folders) and hidden files are passed over."""
    found: dict[str, str] = {}

    def walk(rel: str, parts: list[str]) -> None:
        head, rest = parts[0], parts[1:]
        folder = os.path.join(top, rel)
        if not any(c in head for c in "*?["):  # a literal name: one lstat
            try:
                st = os.lstat(os.path.join(folder, head))
            except (FileNotFoundError, NotADirectoryError):
                return
            if rest and stat.S_ISDIR(st.st_mode):
                walk(f"{rel}{head}/", rest)
            elif not rest and stat.S_ISREG(st.st_mode):
                found[f"{rel}{head}"] = _stamp(st)
            return
        try:
            with os.scandir(folder) as it:
                entries = [e for e in it if fnmatch.fnmatchcase(e.name, head)]
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:  # the type comes with the directory read; only a file costs a stat
            if rest:
                if entry.is_dir(follow_symlinks=False) and is_name(entry.name):
                    walk(f"{rel}{entry.name}/", rest)
            elif entry.is_file(follow_symlinks=False) and not entry.name.startswith("."):
                found[f"{rel}{entry.name}"] = _stamp(entry.stat(follow_symlinks=False))

    top = str(root.root)
    for prefix, pattern in scope:
        walk("", (prefix + pattern).split("/"))
    return found


def lora_header(path: Path) -> dict[str, str]:
    """The metadata of a safetensors header, read as the format defines it (8-byte length, JSON): no tensor
    framework is imported, so thousands of headers are read in a command that must answer in a second."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= MAX_HEADER:
                raise ValueError
            header = json.loads(f.read(size))
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError
    except (ValueError, AttributeError):
        raise UserError("not a safetensors file (its header cannot be read)", path) from None
    return {str(k): str(v) for k, v in metadata.items()}


def _version_rows(root: DataRoot, src: str) -> dict[str, list[tuple[Any, ...]]]:
    folder = root.root / src.rsplit("/", 1)[0]
    version = folder.name
    # Imported here, and report.json read as data: the manifest's module imports numpy and PIL, the report's the
    # whole validation, which a query with nothing to catch up with must not wait for (a report without `passed`
    # has not passed).
    from lora_pipeline.core.datasets.snapshot.manifest import IMAGE_KINDS, read_manifest, read_snapshot_info

    info = read_snapshot_info(folder)
    report = read_json(folder / REPORT_JSON)
    rows = read_manifest(folder)
    errors = errors_in(report.get("problems") or [])
    first = f"{errors[0]['file']}: {errors[0]['message']}" if errors else None
    images = sum(r.kind in IMAGE_KINDS for r in rows)
    out: dict[str, list[tuple[Any, ...]]] = {
        "versions": [
            (
                version,
                info.manifest_root,
                info.spec_sha256,
                int(bool(info.spec.get("merge"))),
                info.spec.get("intent", ""),
                info.created_at,
                images,
                int(report.get("passed") is True and not errors),
                len(errors),
                first,
            )
        ],
        "parents": [(version, parent) for parent in info.parents],
        "files": [],
    }
    uses: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    for row in rows:
        direct = row.source_batch is not None
        batch = row.source_batch if direct else row.origin_batch
        if batch is None:
            continue
        path, sha = (row.source_path, row.source_sha256) if direct else (row.origin_path, row.origin_sha256)
        own = bytes.fromhex(row.sha256)
        source = None if sha is None or sha == row.sha256 else bytes.fromhex(sha)
        out["files"].append((version, row.path, row.kind, int(direct), batch, path, own, source))
        counts = uses[batch]
        counts[0 if direct else 1] += 1
        counts[2] += row.kind in IMAGE_KINDS
    out["uses"] = [(version, batch, *counts) for batch, counts in sorted(uses.items())]
    return out


def _lora_rows(root: DataRoot, src: str) -> dict[str, list[tuple[Any, ...]]]:
    path = root.root / src
    meta = lora_header(path)
    if not meta.get(f"{KEY}dataset_version"):
        raise UserError("has no lora_pipeline provenance in its header (not trained by this pipeline)", path)

    def number(key: str) -> int | None:
        value = meta.get(key)
        return int(value) if value is not None and value.isdigit() else None

    return {
        "loras": [
            (
                src,
                meta[f"{KEY}dataset_version"],
                meta.get(f"{KEY}recipe"),
                number(f"{KEY}epoch"),
                number("ss_steps"),
                meta.get("sshs_model_hash"),
                meta.get(f"{KEY}mlflow_run_id"),
                meta.get(f"{KEY}manifest_root"),
            )
        ]
    }


def _recommendation_rows(root: DataRoot, src: str) -> dict[str, list[tuple[Any, ...]]]:
    path = root.root / src
    rec = read_json(path)
    if not isinstance(rec, dict) or not isinstance(rec.get("recommended_epoch"), int):
        raise UserError("not a recommendation (no recommended_epoch)", path)
    _, version, recipe, _ = src.split("/")
    return {
        "recommendations": [
            (
                src,
                rec.get("version", version),
                rec.get("recipe", recipe),
                rec["recommended_epoch"],
                rec.get("recommended_file"),
                rec.get("training_run_id"),
            )
        ]
    }


READERS = {"datasets": _version_rows, "loras": _lora_rows, "evals": _recommendation_rows}


def read_rows(root: DataRoot, src: str) -> dict[str, list[tuple[Any, ...]]]:
    """{table: rows} of one file of a scan, each row in its table's column order (lineage_index.TABLES)."""
    return READERS[src.split("/", 1)[0]](root, src)
