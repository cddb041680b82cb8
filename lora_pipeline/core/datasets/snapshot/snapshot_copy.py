"""Copying a snapshot's planned files, using the hashes already on record where they can be trusted.

A source file whose sha256 is on record is copied inside the kernel without being read here: a batch
file while its stat matches its hash-cache entry exactly (see hashcache), or an image of an earlier
snapshot while it has its recorded size and has not changed since that snapshot.json was written
(an earlier snapshot is a read-only record). `copy_unread` checks the stat again after the copy; if
it moved, the copy is discarded and redone the hashing way, so a file that changed during a build
never gets a stale hash. Batch hashes learnt by hashing are added to the cache.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from lora_pipeline.core.datasets.snapshot.manifest import ManifestRow
from lora_pipeline.core.datasets.snapshot.snapshot_plan import PlannedFile, SnapshotPlan
from lora_pipeline.core.datasets.sources.copying import Copied, copy_file, copy_unread, stat_key
from lora_pipeline.core.datasets.sources.hashcache import (
    Entry,
    ImageSize,
    fingerprint_files,
    image_size,
    load_cache,
    record,
    trustworthy,
)
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import SNAPSHOT, DataRoot


@dataclass(frozen=True)
class Known:
    """A planned file's hash on record, trusted for a copy only while `accept` approves the source's stat."""

    sha256: str
    size: ImageSize | None  # None: not on record (a row of a snapshot built before sizes were oriented)
    accept: Callable[[os.stat_result], bool]


def _unchanged_since(size: int, sealed_ns: int, st: os.stat_result) -> bool:
    """An earlier snapshot's image still as recorded: same size, no change since snapshot.json was written."""
    return st.st_size == size and max(st.st_mtime_ns, st.st_ctime_ns) < sealed_ns


def _batch_caches(root: DataRoot, plan: SnapshotPlan) -> dict[str, dict[str, Entry]]:
    return {ref.name: load_cache(root, ref.name) for ref in plan.sources if ref.batch}


def known_hashes(root: DataRoot, plan: SnapshotPlan) -> list[Known | None]:
    """Each planned file's hash on record: its batch's hash-cache entry, or its earlier snapshot's row."""
    caches = _batch_caches(root, plan)
    sealed = {ref.name: (root.dataset(ref.name) / SNAPSHOT).stat().st_mtime_ns for ref in plan.sources if ref.dataset}
    known: list[Known | None] = []
    for f in plan.files:
        if f.source_sha256 is not None:
            accept = partial(_unchanged_since, f.bytes, sealed[f.source_name])
            known.append(Known(f.source_sha256, f.size, accept))
        elif entry := caches[f.source_name].get(f.source_path):
            known.append(Known(entry.sha256, entry.size, entry.describes))
        else:
            known.append(None)
    return known


def record_hashes(root: DataRoot, found: list[tuple[str, Entry]]) -> None:
    """Add (batch, entry) pairs learnt while building to the batches' hash caches."""
    by_batch: dict[str, list[Entry]] = defaultdict(list)
    for batch, entry in found:
        by_batch[batch].append(entry)
    for batch, entries in by_batch.items():
        record(root, batch, entries)


# One copied file: its manifest row, the copy, and a hash-cache entry to record (or None).
Copy = tuple[ManifestRow, Copied, Entry | None]


def copy_planned(f: PlannedFile, known: Known | None, staging: Path) -> Copy:
    """Copy one planned file into the staging folder: in the kernel under its known hash while the source's
    stat vouches for it, else hashing the bytes on the way. Returns its manifest row, the copy, and the
    hash-cache entry learnt for a batch file that had to be hashed (None if there is none to record)."""
    dest = staging / f.dest
    started = time.time_ns()
    try:
        copied = copy_unread(f.src, dest, known.accept) if known else None
        if copied is None:
            copied = copy_file(f.src, dest)
    except FileNotFoundError:
        raise UserError(f"source file vanished during the build ({f.source_kind} '{f.source_name}')", f.src) from None
    entry = None
    if known is not None and copied.sha256 is None:
        sha, size = known.sha256, known.size or image_size(dest)
    else:
        sha, size = copied.sha256, image_size(dest)
        if f.source_sha256 is not None and sha != f.source_sha256:
            raise UserError(
                f"no longer matches the manifest of dataset '{f.source_name}'; "
                f"run `lora-pipeline verify {f.source_name}`",
                f.src,
            )
        if f.source_kind == "batch" and trustworthy(copied.before, copied.after, started):
            entry = Entry(f.source_path, sha, copied.bytes, size, stat_key(copied.before))
    row = ManifestRow(
        path=f.dest,
        kind="image",
        sha256=sha,
        bytes=copied.bytes,
        **size._asdict(),  # width/height as training sees them (EXIF orientation applied), stored_* as in the file
        **{f"source_{f.source_kind}": f.source_name},
        source_path=f.source_path,
        source_sha256=sha,
        **(f.origin or {"origin_batch": f.source_name, "origin_path": f.source_path, "origin_sha256": sha}),
        **({"renamed_from": f.renamed_from} if f.renamed_from else {}),
    )
    return row, copied, entry


def current_hashes(root: DataRoot, plan: SnapshotPlan) -> tuple[list[str], int]:
    """The sha256 of every planned file as it is now, and how many had to be read: dataset sources by their
    manifest rows, batch files by their hash-cache entries while the stat matches, the rest hashed (and cached)."""
    caches = _batch_caches(root, plan)
    shas, todo = [], []
    for i, f in enumerate(plan.files):
        entry = None if f.source_sha256 else caches[f.source_name].get(f.source_path)
        if f.source_sha256:
            shas.append(f.source_sha256)
        elif entry and entry.describes(os.lstat(f.src)):
            shas.append(entry.sha256)
        else:
            shas.append("")  # filled in below
            todo.append(i)
    found = fingerprint_files([(plan.files[i].src, plan.files[i].source_path, True) for i in todo])
    for i, (entry, _) in zip(todo, found, strict=True):
        shas[i] = entry.sha256
    record_hashes(root, [(plan.files[i].source_name, e) for i, (e, ok) in zip(todo, found, strict=True) if ok])
    return shas, len(todo)
