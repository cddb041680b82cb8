"""Stat-validated sha256 cache for base-model files, so a 24 GB FLUX.1 transformer is hashed once, not per check.

A run hashes its base model's weights several times (the trainer's `base_model_hash`, the VAE hash of the latent
cache, the text encoders' files of the text cache, the `lora_epochs` asset's provenance check, each later
`provenance`), and each pass over a full-size FLUX.1 is ~10 s on fast NVMe and minutes on slower disks. Here each
file's sha256 is kept in `<data root>/.cache/models/` with the stat of the version that was hashed (resolved
path, size, mtime_ns, ctime_ns, inode, device) and reused while the file's current stat matches all of them.
Any write, truncation, replacement or `touch` moves ctime, which no user call can set, so a changed file is
always hashed again — a same-size rewrite with its mtime forged back included — and provenance still sees it.

The cache can make hashing faster, never make it wrong:
- one small entry file per model file, written atomically (temp file + rename): concurrent writers replace whole
  entries, and a reader sees an old entry or a new one, never a mix;
- each entry carries an HMAC-SHA256 of its fields under a random key (`.key`, made once, mode 0600): an entry that
  does not parse, names another path, or whose check fails (an edited sha256) is ignored and the file hashed
  again, and the new entry replaces it. A key that is not a private regular file of this user is not trusted:
  nothing is read from or written to the cache then (every file is hashed);
- racy entries (git's term: the file changed less than RACY_NS before it was read) and files that changed while
  they were read are not recorded; they are hashed again next time.
Files are read through the no-follow, regular-files-only reader after their path is resolved.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import time
from contextlib import suppress
from pathlib import Path

from lora_pipeline.core.datasets.sources import hashcache
from lora_pipeline.core.datasets.sources.copying import stat_key
from lora_pipeline.core.datasets.sources.regular_files import NotRegularFile, open_regular, read_regular
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_text
from lora_pipeline.core.hashing import LARGE_CHUNK, sha256_bytes, sha256_stream

FOLDER = "models"  # under the data root's .cache/
KEY_FILE = ".key"
ENTRY_LIMIT = 64 * 1024  # bytes of one entry file (a real one is ~300)
FIELDS = ("size", "mtime_ns", "ctime_ns", "ino", "dev")  # stat_key's order
# The sources cache's racy window; read at each call, so a test that hashes files it has just written sets it to 0.
RACY_NS = hashcache.RACY_NS


def file_sha256(path: Path, cache: Path | None) -> str:
    """The sha256 of a base-model file (links resolved). With `cache` (a data root's `.cache` folder) it is served
    from there while the file is the version that was hashed, and recorded there after hashing."""
    real = Path(os.path.realpath(path))
    folder = cache / FOLDER if cache is not None else None
    key = _key(folder) if folder is not None else None
    entry = folder / f"{sha256_bytes(str(real).encode())}.json" if folder is not None else None
    if key is not None and entry is not None:
        cached = _cached(entry, key, str(real), stat_key(os.stat(real)))
        if cached is not None:
            return cached
    started = time.time_ns()
    with open_regular(real, buffered=True) as f:
        before = os.fstat(f.fileno())
        sha = sha256_stream(f, LARGE_CHUNK)[0]
        after = os.fstat(f.fileno())
    if key is not None and entry is not None and hashcache.trustworthy(before, after, started, RACY_NS):
        row = {"path": str(real), "sha256": sha, **dict(zip(FIELDS, stat_key(before), strict=True))}
        # a data root this user may only read (`provenance`): hashed, not recorded; another process writing the
        # same entry at once (its equal row wins): not recorded twice
        with suppress(PermissionError, FileNotFoundError):
            atomic_write_text(entry, json.dumps(row | {"check": _check(key, row)}, sort_keys=True) + "\n")
    return sha


def _check(key: bytes, row: dict[str, object]) -> str:
    body = json.dumps({k: v for k, v in row.items() if k != "check"}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def _cached(entry: Path, key: bytes, path: str, current: tuple[int, ...]) -> str | None:
    """The recorded sha256 when the entry is intact, for `path`, and of the version with stat `current`; else None
    (missing, damaged, edited, or another version: the caller hashes the file and replaces the entry)."""
    try:
        row = json.loads(read_regular(entry, ENTRY_LIMIT))
        if not isinstance(row, dict) or not hmac.compare_digest(str(row.get("check", "")), _check(key, row)):
            return None
        if row["path"] != path or tuple(int(row[f]) for f in FIELDS) != current:
            return None
        sha = row["sha256"]
    except (FileNotFoundError, UserError, ValueError, KeyError, TypeError):
        return None  # UserError: a link, special file or oversized entry is not read; it is replaced
    return sha if isinstance(sha, str) and len(sha) == 64 else None


def _key(folder: Path) -> bytes | None:
    """The entries' HMAC key, made when there is none; None when the key file is not a private regular file of this
    user (another user, or anyone who could write it, could forge entries with it), or when it cannot be made."""
    path = folder / KEY_FILE
    if not path.exists() and not path.is_symlink():
        try:
            hashcache.create_key_file(path)
        except PermissionError:
            return None  # a data root this user may only read: no cache
    try:
        with open_regular(path) as f:
            st = os.fstat(f.fileno())
            key = f.read(65)
    except (FileNotFoundError, NotRegularFile):
        return None
    private = st.st_uid == os.getuid() and not st.st_mode & (stat.S_IRWXG | stat.S_IRWXO)
    return key if private and len(key) == 32 else None
