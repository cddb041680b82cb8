"""Source batches: reading `sources/<batch>/` (never writing it) and copy-only intake of handoffs.

A batch is complete when it holds `_READY`. Scanning never follows symlinks: a link inside a
handoff may point anywhere (another batch, a home folder), and copying through it would make
the snapshot depend on files nobody handed off. Junk (OS metadata, hidden files) is skipped and
reported so that a user sees what was left out and why.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from lora_pipeline.core.datasets.problems import Problem, problem
from lora_pipeline.core.datasets.sources.copying import background_writeback, copy_file, fsync_dir, sync_filesystem
from lora_pipeline.core.datasets.sources.hashcache import HASH_WORKERS, fingerprint_files, record
from lora_pipeline.core.datasets.sources.regular_files import NotRegularFile, is_regular
from lora_pipeline.core.datasets.sources.retired import retired_batches, retired_error
from lora_pipeline.core.datasets.sources.staging import map_in_threads, remove_abandoned, staging_folder
from lora_pipeline.core.datasets.spec import DatasetSpec, SourceRef
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_text
from lora_pipeline.core.hashing import merkle_root
from lora_pipeline.core.names import require_name
from lora_pipeline.core.paths import READY_MARKER, RIGHTS_FILE, DataRoot

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
JUNK_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
UNDECODABLE_MESSAGE = "file name is not valid UTF-8: skipped, never copied; rename it and hand it off again"


def is_junk(name: str) -> bool:
    """OS litter and hidden files or folders: never content, never copied."""
    return name in JUNK_NAMES or name.startswith(".")


def is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class BatchFile:
    path: str  # posix path relative to the batch folder
    abs: Path
    bytes: int


@dataclass
class BatchScan:
    root: DataRoot
    batch: str
    dir: Path
    files: list[BatchFile] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def printable_name(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (kept by Python as surrogates) shown as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _undecodable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def walk_files(top: Path, scope: str) -> tuple[list[BatchFile], list[Problem]]:
    """Regular, non-junk files under `top` (sorted by path), without following any symlink.

    The top-level `_READY` marker and `_RIGHTS.yaml` are neither content nor a problem. Everything skipped is
    returned as a warning problem with `file` relative to `top`. A name that is not valid UTF-8
    cannot be written into a manifest or a caption table's `file` column, so it is skipped too.
    """
    files: list[BatchFile] = []
    problems: list[Problem] = []

    def skip(rel: str, code: str, message: str) -> None:
        problems.append(problem(rel, code, "warning", message, scope))

    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(top).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        kept = []
        for name in sorted(dirnames):
            if _undecodable(name):
                skip(printable_name(prefix + name) + "/", "undecodable_name", UNDECODABLE_MESSAGE)
            elif is_junk(name):
                skip(prefix + name + "/", "junk_skipped", "hidden or system folder skipped, never copied")
            elif (here / name).is_symlink():
                skip(prefix + name + "/", "symlink_not_followed", "link to a folder not followed, never copied")
            else:
                kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            rel = prefix + name
            if not prefix and name in (READY_MARKER, RIGHTS_FILE):
                continue
            if _undecodable(name):
                skip(printable_name(rel), "undecodable_name", UNDECODABLE_MESSAGE)
                continue
            if is_junk(name):
                skip(rel, "junk_skipped", "hidden or system file skipped, never copied")
                continue
            path = here / name
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                skip(rel, "symlink_not_followed", "symbolic link not followed, never copied")
            elif not stat.S_ISREG(st.st_mode):
                skip(rel, "not_a_regular_file", "not a regular file (device, socket or pipe), never copied")
            else:
                files.append(BatchFile(rel, path, st.st_size))
    files.sort(key=lambda f: f.path)
    return files, problems


def scan_batch(root: DataRoot, batch: str) -> BatchScan:
    """List a complete batch's files and what was skipped; raises UserError if it is missing or not ready."""
    top = root.batch(batch)
    if top.is_symlink():
        raise UserError("batch folder is a symbolic link; bring the handoff in with `lora-pipeline intake`", top)
    if not top.is_dir():
        raise UserError("batch folder not found", top)
    if not (top / READY_MARKER).is_file():
        raise UserError(f"batch is not complete: no {READY_MARKER} marker", top)
    files, problems = walk_files(top, f"batch:{batch}")
    return BatchScan(root=root, batch=batch, dir=top, files=files, problems=problems)


def batch_manifest(scan: BatchScan) -> list[dict[str, Any]]:
    """One row {path, sha256, bytes} per content file of the batch, sorted by path.

    Every file is hashed (this is the batch's registration), and what was found, with image sizes
    and the stat that vouches for it, replaces the batch's hash cache (see hashcache), so that a
    snapshot build can copy these files without reading them again.
    """
    found = fingerprint_files([(f.abs, f.path, is_image(f.path)) for f in scan.files])
    record(scan.root, scan.batch, [entry for entry, cacheable in found if cacheable], replace=True)
    return [{"path": e.path, "sha256": e.sha256, "bytes": e.bytes} for e, _ in found]


def batch_fingerprint(rows: list[dict[str, Any]]) -> str:
    return merkle_root(rows)


@dataclass
class IntakeResult:
    batch: str
    dir: Path
    files: int
    bytes: int
    rows: list[dict[str, Any]]
    fingerprint: str
    skipped: list[Problem]  # junk and symlinks left behind in the handoff
    copy_methods: dict[str, int]


def intake(src_dir: Path, root: DataRoot, batch: str) -> IntakeResult:
    """Copy an external handoff into `sources/<batch>` and mark it `_READY`; `src_dir` is only read.

    The copy lands in a hidden staging folder beside the target and is renamed into place
    only when complete, so a batch folder never holds half a handoff; `_READY` comes last.
    Its hashes are not put in the hash cache: the copies are brand new, so by the racy rule
    (see hashcache) they could not be trusted; `source_batch` registers the batch soon after.
    """
    require_name(batch, "batch id")
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise UserError("handoff folder not found (or not a folder)", src_dir)
    target = root.batch(batch)
    if os.path.lexists(target):
        raise UserError(
            "batch already exists; batches are never overwritten or merged into — use a new batch id", target
        )
    files, skipped = walk_files(src_dir, f"batch:{batch}")
    if not files:
        raise UserError("handoff folder holds no files to copy", src_dir)
    root.sources.mkdir(parents=True, exist_ok=True)
    remove_abandoned(root.sources)
    with staging_folder(root.sources, batch) as staging:
        for d in sorted({Path(f.path).parent for f in files}):
            (staging / d).mkdir(parents=True, exist_ok=True)
        with background_writeback(staging):
            copied = map_in_threads(lambda f: copy_file(f.abs, staging / f.path), files, HASH_WORKERS)
        rows = [{"path": f.path, "sha256": c.sha256, "bytes": c.bytes} for f, c in zip(files, copied, strict=True)]
        fingerprint = batch_fingerprint(rows)
        created_at = datetime.now(UTC).isoformat(timespec="seconds")
        marker = {"batch": batch, "files": len(rows), "fingerprint": fingerprint, "created_at": created_at}
        # The marker is written before the rename: a batch folder either is complete or does not exist.
        atomic_write_text(staging / READY_MARKER, json.dumps(marker, sort_keys=True) + "\n", readonly=True)
        sync_filesystem(staging)
        if os.path.lexists(target):
            raise UserError("batch appeared while copying; not overwriting it", target)
        os.rename(staging, target)
    fsync_dir(root.sources)
    return IntakeResult(
        batch=batch,
        dir=target,
        files=len(rows),
        bytes=sum(r["bytes"] for r in rows),
        rows=rows,
        fingerprint=fingerprint,
        skipped=skipped,
        copy_methods=dict(Counter(c.method for c in copied)),
    )


def expand_sources(root: DataRoot, spec: DatasetSpec, include_retired: bool = False) -> list[SourceRef]:
    """The spec's sources with every batch pattern ("curated-*") replaced by the ready batches it matches.

    A pattern that matches no ready batch is an error: the spec would silently lose a source. Retired batches
    (retired.py) are not matched, and a batch named explicitly that is retired is refused, unless
    `include_retired` (a version already built keeps what it was built from).
    """
    expanded: list[SourceRef] = []
    retired = {} if include_retired else retired_batches(root)
    ready = [b for b in root.ready_batches() if b not in retired]
    for ref in spec.sources:
        if ref.batch in retired:
            raise retired_error(ref.batch, retired[ref.batch], root.spec_file(spec.name))
        if not ref.is_pattern:
            expanded.append(ref)
            continue
        matches = [b for b in ready if fnmatch.fnmatchcase(b, ref.name)]
        if not matches:
            gone = [b for b in retired if fnmatch.fnmatchcase(b, ref.name)]
            why = f" (retired: {', '.join(gone)})" if gone else ""
            raise UserError(f"batch pattern '{ref.name}' matches no ready batch{why}", root.spec_file(spec.name))
        expanded += [dataclasses.replace(ref, batch=b) for b in matches]
    return expanded


def spec_batches(root: DataRoot, spec: DatasetSpec) -> list[str]:
    """The batches the spec's sources name, patterns expanded, in order; retired batches included, so that the
    steps after the snapshot of a version built before a retirement still read what they read then."""
    return list(dict.fromkeys(ref.batch for ref in expand_sources(root, spec, include_retired=True) if ref.batch))


def safe_relative(file: str, folder: Path) -> str | None:
    """`file` as a normalised path inside `folder`, or None when it is absolute or leaves the folder."""
    posix = PurePosixPath(file.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(file).drive or ".." in posix.parts:
        return None
    if not (folder / posix).resolve().is_relative_to(folder.resolve()):
        return None  # a symlink pointing out of the batch
    return posix.as_posix()


def locate_table(root: DataRoot, spec: DatasetSpec) -> tuple[str, str, Path]:
    """(batch, path inside it, path) of the spec's caption table; UserError if it is missing, outside the
    batch, a symbolic link or not a regular file."""
    ref = spec.captions.table or ""
    spec_file = root.spec_file(spec.name)
    batches = spec_batches(root, spec)
    head, _, rest = ref.partition("/")
    if rest and head in batches:
        batch, rel = head, rest
    elif len(batches) == 1:
        batch, rel = batches[0], ref
    else:
        names = ", ".join(batches) or "none"
        raise UserError(f"captions.table '{ref}' must start with one of the spec's batches ({names})", spec_file)
    if os.path.islink(root.batch(batch) / rel):
        raise NotRegularFile(root.batch(batch) / rel, "symlink_not_followed")
    safe = safe_relative(rel, root.batch(batch))
    if safe is None:
        raise UserError(f"captions.table '{ref}' must be a path inside batch '{batch}'", spec_file)
    path = root.batch(batch) / safe
    if not os.path.lexists(path):
        raise UserError("caption table not found", path)
    if not is_regular(path):
        raise NotRegularFile(path, "not_a_regular_file")
    return batch, safe, path
