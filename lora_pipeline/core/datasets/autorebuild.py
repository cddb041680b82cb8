"""Auto-rebuild: a spec with `auto_rebuild: true` and a glob batch source gets a NEW version when a
matching batch lands. The old version is never touched; the new spec says which batch made it."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import yaml

from lora_pipeline.core.datasets.manifest import SNAPSHOT
from lora_pipeline.core.datasets.snapshot_plan import family, next_free_version, version_number
from lora_pipeline.core.datasets.spec import DatasetSpec, load_spec
from lora_pipeline.core.fileio import read_json
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.yamlfile import load_yaml_mapping


def _glob_sources(spec: DatasetSpec) -> list[str]:
    return [s.name for s in spec.sources if s.is_pattern]


@dataclass(frozen=True)
class AutoRebuild:
    from_version: str
    new_version: str
    batch: str
    spec_path: Path


def latest_auto_rebuild_specs(root: DataRoot) -> list[DatasetSpec]:
    """Per dataset family, the newest spec that asks for auto-rebuild with a glob batch source."""
    newest: dict[str, DatasetSpec] = {}
    for version in root.spec_versions():
        spec = load_spec(root.spec_file(version))
        if not (spec.auto_rebuild and _glob_sources(spec)):
            continue
        name = family(spec.name)
        if name not in newest or version_number(spec.name) > version_number(newest[name].name):
            newest[name] = spec
    return [newest[f] for f in sorted(newest)]


def write_auto_rebuild_specs(root: DataRoot, new_batches: list[str]) -> list[AutoRebuild]:
    """Write one new spec per (auto-rebuild family, matching new batch set); return what was written.

    The new spec is the newest spec of the family with a new name and an intent naming the
    trigger; its glob sources now also match the new batch. Only a built version can be
    outgrown: while the newest version is unbuilt, its own build picks the batch up, and a batch
    its snapshot already holds changes nothing. Files are created exclusively, so an existing
    spec is never overwritten.
    """
    made = []
    for spec in latest_auto_rebuild_specs(root):
        info_path = root.dataset(spec.name) / SNAPSHOT
        if not info_path.is_file():
            continue
        included = {s["name"] for s in read_json(info_path).get("sources", []) if s.get("kind") == "batch"}
        matching = [
            b for b in new_batches
            if b not in included and any(fnmatch.fnmatchcase(b, g) for g in _glob_sources(spec))
        ]
        if not matching:
            continue
        new_version = next_free_version(root, spec.name)
        data = load_yaml_mapping(root.spec_file(spec.name))
        data["name"] = new_version
        data["intent"] = f"auto-rebuild of {spec.name}: batch {', '.join(matching)} landed"
        path = root.spec_file(new_version)
        with open(path, "x", encoding="utf-8") as f:
            yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True)
        made.append(AutoRebuild(spec.name, new_version, ", ".join(matching), path))
    return made
