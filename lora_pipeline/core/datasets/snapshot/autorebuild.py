"""Auto-rebuild: a spec with `auto_rebuild: true` and a glob batch source gets a NEW version when a
matching batch lands. The old version is never touched; the new spec says which batch made it."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lora_pipeline.core.datasets.snapshot.manifest import read_snapshot_info
from lora_pipeline.core.datasets.snapshot.snapshot_plan import family, next_free_version, version_number
from lora_pipeline.core.datasets.spec import DatasetSpec, load_spec
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import SNAPSHOT, DataRoot
from lora_pipeline.core.yamlfile import load_yaml_mapping


def _glob_sources(spec: DatasetSpec) -> list[str]:
    return [s.name for s in spec.sources if s.is_pattern]


@dataclass(frozen=True)
class AutoRebuild:
    from_version: str
    new_version: str
    batch: str
    spec_path: Path


@dataclass(frozen=True)
class AutoRebuildTick:
    """What one look at new batches did: the specs written, and the specs that could not be read."""

    written: list[AutoRebuild] = field(default_factory=list)
    unreadable: list[UserError] = field(default_factory=list)


_loaded: dict[Path, tuple[tuple[int, int, int], DatasetSpec | UserError]] = {}


def _load_cached(path: Path) -> DatasetSpec:
    """`load_spec`, remembered in this process while the file's inode, size and modification time stay the same
    (the sensor's code server looks at every spec whenever a batch lands: a year holds a thousand of them)."""
    st = path.stat()
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _loaded.get(path)
    if cached is None or cached[0] != key:
        try:
            cached = (key, load_spec(path))
        except UserError as exc:
            cached = (key, exc)
        _loaded[path] = cached
    if isinstance(cached[1], UserError):
        raise cached[1]
    return cached[1]


def latest_auto_rebuild_specs(root: DataRoot) -> tuple[list[DatasetSpec], list[UserError]]:
    """Per dataset family, the newest spec that asks for auto-rebuild with a glob batch source.

    A spec that fails to load is returned as its error instead of stopping the others. A family
    whose newest spec file is unreadable is left out: its last word is unknown until it is fixed.
    """
    newest: dict[str, DatasetSpec] = {}
    unreadable: list[UserError] = []
    newest_unreadable: dict[str, int] = {}
    for version in root.spec_versions():
        try:
            spec = _load_cached(root.spec_file(version))
        except UserError as exc:
            unreadable.append(exc)
            name = family(version)
            newest_unreadable[name] = max(newest_unreadable.get(name, -1), version_number(version))
            continue
        if not (spec.auto_rebuild and _glob_sources(spec)):
            continue
        name = family(spec.name)
        if name not in newest or version_number(spec.name) > version_number(newest[name].name):
            newest[name] = spec
    usable = [newest[f] for f in sorted(newest) if newest_unreadable.get(f, -1) < version_number(newest[f].name)]
    return usable, unreadable


def write_auto_rebuild_specs(root: DataRoot, new_batches: list[str]) -> AutoRebuildTick:
    """Write one new spec per (auto-rebuild family, matching new batch set); say what was written.

    The new spec is the newest spec of the family with a new name and an intent naming the
    trigger; its glob sources now also match the new batch. Only a built version can be
    outgrown: while the newest version is unbuilt, its own build picks the batch up, and a batch
    its snapshot already holds changes nothing. Files are created exclusively, so an existing
    spec is never overwritten. Unreadable specs are skipped and reported, never a reason to stop.
    """
    specs, unreadable = latest_auto_rebuild_specs(root)
    tick = AutoRebuildTick(unreadable=unreadable)
    for spec in specs:
        if not (root.dataset(spec.name) / SNAPSHOT).is_file():
            continue
        included = {s.name for s in read_snapshot_info(root.dataset(spec.name)).sources if s.kind == "batch"}
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
        data["rebuilt_from"] = spec.name  # its parent in snapshot.json: the v1 -> v2 link is data, not prose
        path = root.spec_file(new_version)
        with open(path, "x", encoding="utf-8") as f:
            yaml.safe_dump(data, f, sort_keys=False, allow_unicode=True)
        tick.written.append(AutoRebuild(spec.name, new_version, ", ".join(matching), path))
    return tick
