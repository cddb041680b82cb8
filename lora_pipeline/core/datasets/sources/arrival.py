"""Safe arrival: when a folder under `sources/` may become a batch, and that it stays what was registered.

A folder is a batch candidate only when its name is a valid batch id that does not end in `.tmp`, `.part` or
`.partial` (a name starting with `.` is no name at all; `DataRoot.ready_batches` leaves both out), `_READY` is
present, and its listing (the path, size and modification time of every file, hidden ones included, since a
copy tool writes its temporary files there) is the same at two looks at least `arrival_settle_seconds` apart
(core/settings.py). `source_batch_sensor` keeps its first look in the sensor's cursor and registers the batch
at a later tick, so a folder still being written is never snapshotted half-way.

Registering a batch (the `source_batch` asset) records the listing of its content files in
`registered/<batch>.json`. A batch is only ever read: a build whose batch no longer matches that record is
refused in one line naming the first file that changed (`require_as_registered`); the change belongs in a new
batch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from lora_pipeline.core.datasets.sources.batches import BatchScan
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_text, read_json
from lora_pipeline.core.hashing import sha256_json
from lora_pipeline.core.names import require_name
from lora_pipeline.core.paths import DataRoot

REGISTERED = "registered"  # the folder of the registration records, under the data root
Listing = dict[str, list[int]]  # relative path -> [size, mtime_ns]


def folder_listing(folder: Path) -> Listing:
    """Every file and link under `folder` (hidden ones too, links not followed) with its size and mtime."""
    found: Listing = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        for name in filenames + [d for d in dirnames if (here / d).is_symlink()]:
            try:
                st = os.lstat(here / name)
            except FileNotFoundError:  # removed between the walk and the stat: the listing is moving
                continue
            found[(here / name).relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns]
    return found


@dataclass(frozen=True)
class ArrivalLook:
    """One look of the batch sensor: the batches whose listing held still, those still waiting, the new cursor."""

    settled: list[str]
    waiting: list[str]
    cursor: str


def _previous_looks(cursor: str | None) -> dict[str, dict]:
    """The looks a cursor remembers; an unreadable or foreign cursor remembers nothing (every folder is looked
    at again, which costs one more tick, never a half-copied batch)."""
    try:
        looks = json.loads(cursor or "{}").get("arrivals", {})
    except (json.JSONDecodeError, AttributeError):
        return {}
    return looks if isinstance(looks, dict) else {}


def look_at_arrivals(
    root: DataRoot, batches: list[str], cursor: str | None, now: float, settle_seconds: float
) -> ArrivalLook:
    """Which of `batches` (ready, not yet registered) have held still since an earlier look at least
    `settle_seconds` ago. A batch seen for the first time, or whose listing moved, waits for a later look."""
    previous = _previous_looks(cursor)
    settled, waiting, looks = [], [], {}
    for batch in batches:
        digest = sha256_json(folder_listing(root.batch(batch)))
        before = previous.get(batch)
        if isinstance(before, dict) and before.get("listing") == digest:
            since = float(before.get("since", now))
            if now - since >= settle_seconds:
                settled.append(batch)
                continue
            looks[batch] = {"listing": digest, "since": since}
        else:
            looks[batch] = {"listing": digest, "since": now}
        waiting.append(batch)
    return ArrivalLook(settled, waiting, json.dumps({"arrivals": looks}, sort_keys=True))


def registration_file(root: DataRoot, batch: str) -> Path:
    return root.root / REGISTERED / f"{require_name(batch, 'batch id')}.json"


def content_listing(scan: BatchScan) -> Listing:
    """The size and mtime of each content file of a scanned batch (what a build copies)."""
    listing: Listing = {}
    for f in scan.files:
        st = os.lstat(f.abs)
        listing[f.path] = [st.st_size, st.st_mtime_ns]
    return listing


def _first_change(recorded: Listing, current: Listing) -> tuple[str, str] | None:
    """(file, what happened to it) of the first path, in order, where the two listings differ; None if equal."""
    for path in sorted(set(recorded) | set(current)):
        if path not in current:
            return path, "removed"
        if path not in recorded:
            return path, "added"
        size, mtime = recorded[path]
        if current[path][0] != size:
            return path, f"size changed from {size} to {current[path][0]} bytes"
        if current[path][1] != mtime:
            return path, "modified (its modification time moved)"
    return None


def _changed_error(scan: BatchScan, path: str, what: str) -> UserError:
    return UserError(
        f"batch '{scan.batch}' changed after it was registered ({what}); a batch is only ever read: put the "
        "change in a new batch (lora-pipeline intake)",
        scan.dir / path,
    )


def _recorded_listing(root: DataRoot, batch: str) -> Listing | None:
    path = registration_file(root, batch)
    if not path.is_file():
        return None
    record = read_json(path)
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):
        raise UserError("damaged registration record (no 'files'); restore it from a backup", path)
    return files


def require_as_registered(root: DataRoot, scan: BatchScan) -> None:
    """UserError naming the first file in which a registered batch differs from its registration; a batch
    never registered (a core-only build) has nothing to compare with."""
    recorded = _recorded_listing(root, scan.batch)
    if recorded is None:
        return
    change = _first_change(recorded, content_listing(scan))
    if change is not None:
        raise _changed_error(scan, *change)


def record_registration(root: DataRoot, scan: BatchScan, fingerprint: str) -> Path:
    """Record the batch's listing at its registration (once: registering it again checks it instead)."""
    path = registration_file(root, scan.batch)
    if path.is_file():
        require_as_registered(root, scan)
        return path
    record = {
        "batch": scan.batch,
        "fingerprint": fingerprint,
        "registered_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": content_listing(scan),
    }
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n", readonly=True)
    return path
