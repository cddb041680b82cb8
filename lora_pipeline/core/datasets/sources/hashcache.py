"""Stat-validated hash cache: a source file is hashed once, the way git's index avoids re-hashing.

When a batch's files are hashed (`sources.batch_manifest`, which the `source_batch` asset runs when
the batch lands, or a snapshot build that had to hash them), each file's sha256, size and image
dimensions (as training sees them after EXIF orientation, and as stored) are recorded in
`data/.cache/batches/<batch>.jsonl` with the stat of the version that was hashed: size, mtime_ns,
ctime_ns, inode and device. A reader trusts an entry only while the file's current stat matches all
five exactly. Any write, truncation, replacement or `touch` moves ctime, which no user call can set,
so a changed file is never given its old hash — not even when its size is unchanged and its mtime
was forged back with utime.

Racy entries (git's term) are never recorded: where a file had changed less than RACY_NS before it
was hashed, a second change within the same timestamp tick could leave every stat field equal.
A file that changed while it was being hashed is not recorded either. Both are simply hashed
again next time, and recorded then. The cache lives under the data root, never under sources/,
and losing it costs only time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from PIL import Image

from lora_pipeline.core.datasets.images import TRANSPOSING_ORIENTATIONS, header_orientation, strict_pillow
from lora_pipeline.core.datasets.sources.copying import StatKey, stat_key
from lora_pipeline.core.datasets.sources.regular_files import NotRegularFile, open_regular, read_regular
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_text
from lora_pipeline.core.hashing import sha256_stream
from lora_pipeline.core.paths import DataRoot

# git's 2 s window (FAT and some network filesystems keep 2-second timestamps). Read at each call, not bound at
# import: a test that makes files and registers them at once sets it to 0 rather than waiting the window out.
RACY_NS = 2_000_000_000
HASH_WORKERS = min(4, os.cpu_count() or 1)
CACHE_LIMIT = 1 << 30  # bytes of one batch's cache (a row is about 300 bytes)
STAT_FIELDS = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")


class ImageSize(NamedTuple):
    """An image's size as training sees it (after EXIF orientation) and as the file stores it."""

    width: int | None
    height: int | None
    stored_width: int | None
    stored_height: int | None


UNKNOWN_SIZE = ImageSize(None, None, None, None)


def image_size(source: Path | BinaryIO) -> ImageSize:
    """The size from the header alone, no decode; UNKNOWN_SIZE if Pillow cannot read it —
    not hidden: validation decodes every image and reports the unreadable ones."""
    try:
        with strict_pillow(), Image.open(source) as im:  # a header's size, whatever Pillow's own limit says
            width, height = im.size
            if header_orientation(im) in TRANSPOSING_ORIENTATIONS:
                return ImageSize(height, width, width, height)
            return ImageSize(width, height, width, height)
    except (OSError, ValueError, SyntaxError):
        return UNKNOWN_SIZE


@dataclass(frozen=True)
class Entry:
    """What hashing one version of a file found; `stat` says which version."""

    path: str  # relative to the batch folder
    sha256: str
    bytes: int
    size: ImageSize
    stat: StatKey

    def describes(self, st: os.stat_result) -> bool:
        """True while the file is still the version that was hashed."""
        return stat_key(st) == self.stat

    def to_json(self) -> dict[str, Any]:
        found = {"path": self.path, "sha256": self.sha256, "bytes": self.bytes}
        return found | self.size._asdict() | dict(zip(STAT_FIELDS, self.stat, strict=True))

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Entry | None:
        """The entry of a cache row; None for a row written before sizes were recorded after EXIF orientation
        (the file is simply hashed again)."""
        if "width" in row and "stored_width" not in row:
            return None
        size, mtime, ctime, ino, dev = (int(row[k]) for k in STAT_FIELDS)
        stat = (size, mtime, ctime, ino, dev)
        return cls(row["path"], row["sha256"], int(row["bytes"]), ImageSize(*(row[k] for k in ImageSize._fields)), stat)


def trustworthy(before: os.stat_result, after: os.stat_result, started_ns: int, racy_ns: int | None = None) -> bool:
    """Whether a hash read between stats `before` and `after`, starting at `started_ns`, may be cached: the
    file did not change while it was read, and its last change is more than the racy window (`racy_ns`,
    default RACY_NS) older."""
    window = RACY_NS if racy_ns is None else racy_ns
    last_change = max(before.st_mtime_ns, before.st_ctime_ns)
    return stat_key(before) == stat_key(after) and last_change < started_ns - window


def fingerprint(path: Path, rel: str, image: bool) -> tuple[Entry, bool]:
    """Hash one file (and read an image's header): its entry and whether the entry may be cached."""
    started = time.time_ns()
    with open_regular(path, buffered=True) as f:
        before = os.fstat(f.fileno())
        sha, size = sha256_stream(f)
        f.seek(0)
        dimensions = image_size(f) if image else UNKNOWN_SIZE
        after = os.fstat(f.fileno())
    return Entry(rel, sha, size, dimensions, stat_key(before)), trustworthy(before, after, started)


def fingerprint_files(files: list[tuple[Path, str, bool]]) -> list[tuple[Entry, bool]]:
    """`fingerprint` of each (path, rel, is_image), in order; threads overlap reads and hashing
    (hashlib releases the GIL)."""
    with ThreadPoolExecutor(HASH_WORKERS) as pool:
        return list(pool.map(lambda job: fingerprint(*job), files))


def cache_file(root: DataRoot, batch: str) -> Path:
    return root.cache / "batches" / f"{batch}.jsonl"


def _key(root: DataRoot, create: bool) -> bytes | None:
    """The caches' HMAC key; made (owner-readable only) when `create` and there is none; None when missing."""
    path = root.cache / ".hashcache.key"
    try:
        return read_regular(path, 64)
    except FileNotFoundError:
        if not create:
            return None
    except NotRegularFile:
        raise UserError("not a regular file; delete it (the hash caches are rebuilt)", path) from None
    create_key_file(path)
    return read_regular(path, 64)


def create_key_file(path: Path) -> None:
    """Write 32 random bytes to `path` (mode 0600) unless a key is there: one another process made meanwhile is
    kept, never overwritten (the HMAC keys of this cache and of the base-model hash cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".key.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        os.write(fd, secrets.token_bytes(32))
        os.fsync(fd)
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.close(fd)
        os.unlink(tmp)


_CHECK = ', "check": "'  # a row's line: its JSON without the check, then this, the check's 64 hex digits, '"}'
_CHECKED_END = len(_CHECK) + 64 + 2


def _signer(key: bytes) -> Callable[[str], str]:
    """HMAC-SHA256 of a row's JSON text (the line without its check), keyed once for every row."""
    keyed = hmac.new(key, digestmod=hashlib.sha256)

    def sign(body: str) -> str:
        mac = keyed.copy()
        mac.update(body.encode())
        return mac.hexdigest()

    return sign


def load_cache(root: DataRoot, batch: str) -> dict[str, Entry]:
    """The recorded entries of a batch by path; empty when nothing was recorded yet. A row whose `check` does
    not match is a UserError; one without a check (or with no key to check it) is left out: hashed again."""
    path = cache_file(root, batch)
    try:
        text = read_regular(path, CACHE_LIMIT).decode("utf-8")
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError:
        raise UserError("hash cache is not UTF-8 text; delete the file (it is rebuilt)", path) from None
    key = _key(root, create=False)
    sign = None if key is None else _signer(key)
    entries = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
            entry = Entry.from_json(row)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise UserError(f"hash cache line {lineno} is damaged; delete the file (it is rebuilt)", path) from None
        if entry is None or sign is None or "check" not in row:
            continue
        if not hmac.compare_digest(line[-_CHECKED_END:], f'{_CHECK}{sign(line[:-_CHECKED_END] + "}")}"}}'):
            raise UserError(f"hash cache line {lineno} does not match its check (edited?); it is not trusted: "
                            "delete the file (it is rebuilt)", path)
        entries[entry.path] = entry
    return entries


def record(root: DataRoot, batch: str, entries: Iterable[Entry], replace: bool = False) -> None:
    """Add entries (only trustworthy ones) to the batch's cache, atomically; `replace` drops all others
    (the whole batch was just hashed). Concurrent writers may lose each other's additions: a lost
    entry costs one more hash, never a wrong one."""
    new = {e.path: e for e in entries}
    if not new and not replace:
        return
    merged = new if replace else load_cache(root, batch) | new
    sign = _signer(_key(root, create=True))
    bodies = [json.dumps(merged[p].to_json(), sort_keys=True) for p in sorted(merged)]
    text = "".join(f'{body[:-1]}{_CHECK}{sign(body)}"}}\n' for body in bodies)
    atomic_write_text(cache_file(root, batch), text)
