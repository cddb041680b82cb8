"""Dataset snapshots: copy-only, immutable, atomic dataset versions (docs/contract.md, "Dataset snapshot layout").

`plan_snapshot` decides which source files go where without touching anything; `build_snapshot`
copies them into a hidden staging folder beside `datasets/<version>` and renames it into place
only once the images, `manifest.jsonl` and `snapshot.json` are complete. A build killed half-way
leaves only a staging folder, which the next intake or build removes (see staging.py). The version
is whole only when the last step (the report) has sealed it (see seal.py); building it again
completes a version whose build was interrupted after the rename.

A source file whose sha256 is already on record is copied in the kernel without being read; every
other file is hashed as it is copied (snapshot_copy says when a recorded hash is trusted).

Durability, like `cp`: the image bytes reach the disk by the kernel's normal writeback; there is no
full-data sync. `manifest.jsonl` and `snapshot.json` are fsynced, and so is `datasets/` after the
rename. The atomic rename guarantees that a killed build never leaves anything under the final
name; damage from a power loss before writeback is caught by the scheduled verification, which
re-hashes every snapshot against its manifest.

An existing version is never rewritten: the same spec over the same source bytes is a no-op,
anything else is refused with the name of a free version to use instead.
"""

from __future__ import annotations

import os
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from lora_pipeline.core.datasets.masks import ALPHA, is_mask
from lora_pipeline.core.datasets.problems import Problem, problem
from lora_pipeline.core.datasets.snapshot.manifest import (
    IMAGE_KINDS,
    ManifestRow,
    SnapshotInfo,
    SourceFingerprint,
    read_manifest,
    read_snapshot_info,
    write_manifest,
    write_snapshot_info,
)
from lora_pipeline.core.datasets.snapshot.seal import read_seal
from lora_pipeline.core.datasets.snapshot.snapshot_copy import (
    Copy,
    Known,
    copy_planned,
    current_hashes,
    known_hashes,
    record_hashes,
)
from lora_pipeline.core.datasets.snapshot.snapshot_extras import (
    add_extras,
    current_mask_hashes,
    mask_fingerprint_rows,
    pair_masks,
    with_mask,
)
from lora_pipeline.core.datasets.snapshot.snapshot_plan import PlannedFile, SnapshotPlan, family, next_free_version
from lora_pipeline.core.datasets.sources.batches import expand_sources, is_image, locate_table, scan_batch
from lora_pipeline.core.datasets.sources.copying import fsync_dir
from lora_pipeline.core.datasets.sources.retired import origin_of, retired_origin_problems
from lora_pipeline.core.datasets.sources.rights import rights_for_rows
from lora_pipeline.core.datasets.sources.staging import map_in_threads, remove_abandoned, staging_folder
from lora_pipeline.core.datasets.spec import DatasetSpec, SourceRef
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import merkle_root
from lora_pipeline.core.locks import exclusive_lock
from lora_pipeline.core.paths import SNAPSHOT, DataRoot

COPY_WORKERS = min(4, max(2, os.cpu_count() or 1))


@dataclass
class SnapshotResult:
    version: str
    dir: Path
    manifest_root: str
    image_root: str
    rows: list[ManifestRow]  # the image rows of manifest.jsonl, sorted by path
    created: bool
    problems: list[Problem]
    copy_methods: dict[str, int]
    hashed: int  # images whose bytes this call read and hashed; the others had a hash on record
    seconds: float


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    """Case-insensitive glob on the relative path or the basename (handoffs come from case-blind systems)."""
    lower = path.lower()
    base = posixpath.basename(lower)
    return any(fnmatchcase(lower, p.lower()) or fnmatchcase(base, p.lower()) for p in patterns)


def _selected(path: str, ref: SourceRef) -> bool:
    return (not ref.include or _matches(path, ref.include)) and not _matches(path, ref.exclude)


def _check_sources(spec: DatasetSpec, sources: list[SourceRef], spec_path: Path) -> None:
    own = family(spec.name)
    seen: set[tuple[str, str]] = set()
    for ref in sources:
        if (ref.kind, ref.name) in seen:
            raise UserError(f"sources list {ref.kind} '{ref.name}' twice; combine its include/exclude globs", spec_path)
        seen.add((ref.kind, ref.name))
        if ref.dataset == spec.name:
            raise UserError(f"dataset '{spec.name}' cannot be a source of itself", spec_path)
        if ref.dataset and not spec.merge and family(ref.dataset) != own:
            raise UserError(
                f"sources mix dataset families {own} and {family(ref.dataset)}; "
                "set merge: true to merge on purpose, or make an independent version",
                spec_path,
            )


def _check_rebuilt_from(root: DataRoot, spec: DatasetSpec, spec_path: Path) -> None:
    """`rebuilt_from` becomes a parent in snapshot.json: it must be a built version of the same family."""
    parent = spec.rebuilt_from
    if parent is None:
        return
    if parent == spec.name or family(parent) != family(spec.name):
        raise UserError(f"rebuilt_from: '{parent}' must be an earlier version of the family {family(spec.name)}",
                        spec_path)
    if not (root.dataset(parent) / SNAPSHOT).is_file():
        raise UserError(f"rebuilt_from: dataset version '{parent}' is not built", spec_path)


def _table_in_batch(table: str | None, batch: str) -> str | None:
    """The captions table's path relative to `batch` (it may be written `<batch>/<path>` or just `<path>`)."""
    if table is None:
        return None
    return table[len(batch) + 1 :] if table.startswith(batch + "/") else table


def _batch_files(root: DataRoot, spec: DatasetSpec, ref: SourceRef) -> tuple[list[PlannedFile], list[Problem]]:
    scan = scan_batch(root, ref.name)
    problems = list(scan.problems)
    table = _table_in_batch(spec.captions.table, ref.name)
    scope = f"batch:{ref.name}"
    masks, mask_problems = pair_masks(scan.files, ref.masks == "file", scope)
    problems += mask_problems
    reg = ref.role == "regularisation"
    files = []
    for f in scan.files:
        if is_mask(f.path) or not _selected(f.path, ref):
            continue
        if is_image(f.path):
            planned, missing = with_mask(
                PlannedFile(
                    dest="",
                    src=f.abs,
                    bytes=f.bytes,
                    source_kind="batch",
                    source_name=ref.name,
                    source_path=f.path,
                    source_sha256=None,
                    origin=None,
                    folder=ref.reg_folder if reg else f"img/{spec.class_folder}",
                    class_tokens=ref.class_tokens if reg else None,
                ),
                ref.masks, masks, scope,
            )
            files.append(planned)
            problems += missing
        elif not (f.path.lower().endswith(".txt") or f.path == table):
            ext = posixpath.splitext(f.path)[1] or "no extension"
            problems.append(
                problem(
                    f.path, "non_image_file", "warning", f"not an image file ({ext}): skipped, not copied",
                    f"batch:{ref.name}",
                )
            )
    return files, problems


def _dataset_files(root: DataRoot, ref: SourceRef, spec_path: Path) -> list[PlannedFile]:
    snap = root.dataset(ref.name)
    if not (snap / SNAPSHOT).is_file():
        raise UserError(
            f"source dataset '{ref.name}' is not built yet; build it first (lora-pipeline build {ref.name})", spec_path
        )
    if read_seal(snap) is None:
        raise UserError(
            f"source dataset '{ref.name}' is not sealed (its build did not finish); "
            f"complete it first (lora-pipeline build {ref.name})",
            spec_path,
        )
    manifest = read_manifest(snap)
    masks = {r.path: r for r in manifest if r.kind == "mask"}
    rows = sorted((r for r in manifest if r.kind == "image"), key=lambda r: r.path)
    return [
        PlannedFile(
            dest="",
            src=snap / r.path,
            bytes=r.bytes,
            source_kind="dataset",
            source_name=ref.name,
            source_path=r.path,
            source_sha256=r.sha256,
            origin={"origin_batch": r.origin_batch, "origin_path": r.origin_path, "origin_sha256": r.origin_sha256},
            size=r.recorded_size,
            mask="none" if r.mask is None else ALPHA if r.mask == ALPHA else "file",
            mask_src=snap / r.mask if r.mask in masks else None,
            mask_source_path=r.mask if r.mask in masks else None,
            mask_sha256=masks[r.mask].sha256 if r.mask in masks else None,
        )
        for r in rows
        if _selected(r.path, ref)
    ]


def _assign_names(files: list[PlannedFile], spec: DatasetSpec) -> tuple[list[PlannedFile], list[Problem]]:
    """Flatten into the class folder with unique stems (case-insensitive, so `a.png`/`A.jpg` cannot share
    `a.txt`); on a collision the file later in spec order becomes `<stem>__<source>[-N].<ext>`."""
    taken: set[str] = set()  # "<folder>/<lower-case stem>"
    named, problems = [], []
    for f in files:
        folder = f.folder or f"img/{spec.class_folder}"
        base = posixpath.basename(f.source_path)
        stem, ext = posixpath.splitext(base)
        name, renamed = base, None
        if f"{folder}/{stem.lower()}" in taken:
            stem = f"{stem}__{f.source_name}"
            name, n = stem + ext, 2
            while f"{folder}/{posixpath.splitext(name)[0].lower()}" in taken:
                name, n = f"{stem}-{n}{ext}", n + 1
            renamed = base
            problems.append(
                problem(
                    f"{folder}/{name}",
                    "basename_collision",
                    "warning",
                    f"renamed from '{base}' ({f.source_kind} '{f.source_name}': {f.source_path}); "
                    "an earlier source already uses that name",
                    f"dataset:{spec.name}",
                )
            )
        taken.add(f"{folder}/{posixpath.splitext(name)[0].lower()}")
        named.append(replace(f, dest=f"{folder}/{name}", folder=folder, renamed_from=renamed))
    return named, problems


def plan_snapshot(root: DataRoot, spec: DatasetSpec, include_retired: bool = False) -> SnapshotPlan:
    """Resolve the spec's sources, in order, into the list of images to copy; reads only. Retired batches are left
    out (refused when named) unless `include_retired`: an existing version is compared with what it was built from."""
    spec_path = root.spec_file(spec.name)
    sources = expand_sources(root, spec, include_retired)
    _check_sources(spec, sources, spec_path)
    _check_rebuilt_from(root, spec, spec_path)
    files: list[PlannedFile] = []
    problems: list[Problem] = []
    for ref in sources:
        if ref.batch:
            found, found_problems = _batch_files(root, spec, ref)
            problems += found_problems
        else:
            found = _dataset_files(root, ref, spec_path)
        if not found:
            problems.append(
                problem("", "source_empty", "warning", f"no images selected from {ref.kind} '{ref.name}'", "spec")
            )
        files += found
    if not files:
        raise UserError("no images selected from any source; check the source names and include/exclude", spec_path)
    if spec.captions.source != "sidecar" and any(ref.batch for ref in sources):
        locate_table(root, spec)  # a missing or linked caption table fails here, before anything is copied
    files, renames = _assign_names(files, spec)
    return SnapshotPlan(spec=spec, spec_path=spec_path, sources=sources, files=files, problems=problems + renames)


def _fingerprints(plan: SnapshotPlan, shas: list[str], sizes: list[int]) -> tuple[list[SourceFingerprint], str]:
    """Per-source Merkle roots and one root over every planned file's identity (source/path) and bytes, and
    over the planned masks (a changed mask is a changed source)."""
    per_source: dict[tuple[str, str], list[dict[str, Any]]] = {(r.kind, r.name): [] for r in plan.sources}
    overall = []
    for f, sha, size in zip(plan.files, shas, sizes, strict=True):
        per_source[(f.source_kind, f.source_name)].append({"path": f.source_path, "sha256": sha, "bytes": size})
        overall.append({"path": f"{f.source_kind}:{f.source_name}/{f.source_path}", "sha256": sha, "bytes": size})
    overall += mask_fingerprint_rows(plan.files, current_mask_hashes(plan.files))
    sources = [SourceFingerprint(kind=k, name=n, fingerprint=merkle_root(rows)) for (k, n), rows in per_source.items()]
    return sources, merkle_root(overall)


def _immutable_error(root: DataRoot, version: str, what: str) -> UserError:
    return UserError(
        f"dataset version '{version}' already exists with a different spec (or changed sources); versions are "
        f"immutable — name a new version, e.g. {next_free_version(root, version)} ({what})",
        root.spec_file(version),
    )


def _existing(root: DataRoot, spec: DatasetSpec, target: Path, started: float) -> SnapshotResult:
    """A version that is already there: a no-op when spec and source bytes are unchanged, else refused."""
    if not (target / SNAPSHOT).is_file():
        raise UserError(
            f"folder exists without {SNAPSHOT} (not a finished snapshot); versions are never overwritten — "
            f"move it aside or name a new version, e.g. {next_free_version(root, spec.name)}",
            target,
        )
    info = read_snapshot_info(target)
    if info.spec_sha256 != spec.sha256:
        raise _immutable_error(root, spec.name, "the spec changed since it was built")
    plan = plan_snapshot(root, spec, include_retired=True)
    shas, hashed = current_hashes(root, plan)
    _, fingerprint = _fingerprints(plan, shas, [f.bytes for f in plan.files])
    if fingerprint != info.sources_fingerprint:
        raise _immutable_error(root, spec.name, "its source files changed since it was built")
    return SnapshotResult(
        version=spec.name,
        dir=target,
        manifest_root=info.manifest_root,
        image_root=info.image_root,
        rows=[r for r in read_manifest(target) if r.kind in IMAGE_KINDS],
        created=False,
        problems=info.problems,
        copy_methods={},
        hashed=hashed,
        seconds=time.perf_counter() - started,
    )


def _copy_all(plan: SnapshotPlan, known: list[Known | None], staging: Path) -> list[Copy]:
    """`copy_planned` for every planned file, in plan order, on COPY_WORKERS threads. Each task copies a run
    of files: a task per file costs more in thread handoffs than the kernel takes to copy a small image."""
    jobs = list(zip(plan.files, known, strict=True))
    step = -(-len(jobs) // (COPY_WORKERS * 4))
    runs = [jobs[i : i + step] for i in range(0, len(jobs), step)]
    done = map_in_threads(lambda run: [copy_planned(f, k, staging) for f, k in run], runs, COPY_WORKERS)
    return [copy for run in done for copy in run]


def build_snapshot(root: DataRoot, spec: DatasetSpec, code_version: str) -> SnapshotResult:
    """Materialize `datasets/<spec.name>` from the spec's sources (copy-only, atomic, immutable)."""
    started = time.perf_counter()
    version = spec.name
    target = root.dataset(version)
    # Serialize builds of one version across processes; the kernel releases the lock if we are killed.
    with exclusive_lock(root.datasets / f".{version}.lock"):
        if os.path.lexists(target):
            return _existing(root, spec, target, started)
        plan = plan_snapshot(root, spec)
        remove_abandoned(root.datasets)
        with staging_folder(root.datasets, version) as staging:
            for folder in sorted({"img/" + spec.class_folder, *(f.folder for f in plan.files)}):
                (staging / folder).mkdir(parents=True, exist_ok=True)
            done = _copy_all(plan, known_hashes(root, plan), staging)
            rows = [row for row, _, _ in done]
            methods = Counter(copied.method for _, copied, _ in done)
            sources, fingerprint = _fingerprints(plan, [r.sha256 for r in rows], [r.bytes for r in rows])
            rows, extra = add_extras(plan.files, rows, staging)
            rights = rights_for_rows(root, rows)  # in force now (batches with a record): later ones change nothing
            rows = [r.model_copy(update={"rights": rights[b].rights}) if (b := origin_of(r)) in rights else r
                    for r in rows]
            image_root = write_manifest(staging, rows + extra)
            problems = plan.problems + retired_origin_problems(root, rows, version)
            info = SnapshotInfo(
                version=version,
                spec=spec.resolved(),
                spec_sha256=spec.sha256,
                manifest_root=image_root,
                image_root=image_root,
                parents=plan.parents,
                sources=sources,
                sources_fingerprint=fingerprint,
                code_version=code_version,
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                problems=problems,
                captions_complete=False,
                **({"rights": rights} if rights else {}),  # without records, the files of before
            )
            write_snapshot_info(staging, info)
            record_hashes(root, [(f.source_name, e) for f, (_, _, e) in zip(plan.files, done, strict=True) if e])
            os.rename(staging, target)
        fsync_dir(root.datasets)
    return SnapshotResult(
        version=version,
        dir=target,
        manifest_root=image_root,
        image_root=image_root,
        rows=sorted(rows, key=lambda r: r.path),  # images and regularisation images
        created=True,
        problems=problems,
        copy_methods=dict(methods),
        hashed=sum(copied.sha256 is not None for _, copied, _ in done),
        seconds=time.perf_counter() - started,
    )
