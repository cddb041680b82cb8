"""The lineage index: which batches, dataset versions, LoRA files and recommendations belong together.

It answers `lora-pipeline lineage` in well under a second at a team's scale, but it is never the source of
truth: every row is read from the sealed versions (snapshot.json, manifest.jsonl, report.json), the LoRA files'
headers and the evaluations' recommendation.json, and the file `<data root>/.cache/lineage.sqlite` can be
deleted or rebuilt at any time (`lora-pipeline lineage --rebuild`); `verify` derives it again in memory and
names every table that differs (a tampered index).

Each file the index read is recorded with its stamp (size, mtime and inode, git's index rule). `refresh`
re-reads exactly the files whose stamp changed and drops the rows of files that are gone, in one SQLite
transaction; the assets call `update_index` for their own version (or version x recipe) as they materialize,
and a query first catches up with whatever was written outside Dagster. A rebuild writes a new file beside the
old one and renames it over, so a reader never sees half an index. A version is indexed once it is sealed.
"""

from __future__ import annotations

import collections
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.lineage.lineage_sources import read_rows, scan, scope_of
from lora_pipeline.core.paths import DataRoot

INDEX_FILE = "lineage.sqlite"
SCHEMA = "1"  # a file of another schema is rebuilt on open (and named by verify)

# The rows of a version are keyed by `version`; those of a LoRA file or recommendation by `src`, the file (relative
# to the data root) they were read from. sha256s are stored as 32 bytes; a file's source_sha256 only where it
# differs from its own (a caption written from a sidecar or table; an image is a byte copy).
VERSION_TABLES = {
    "versions": "version TEXT PRIMARY KEY, manifest_root TEXT, spec_sha256 TEXT, merge INTEGER, intent TEXT, "
    "created_at TEXT, images INTEGER, passed INTEGER, errors INTEGER, first_error TEXT",
    "parents": "version TEXT NOT NULL, parent TEXT NOT NULL",
    # per version x batch: files copied from the batch itself (direct) or from a parent version (inherited)
    "uses": "version TEXT NOT NULL, batch TEXT NOT NULL, direct INTEGER, inherited INTEGER, images INTEGER",
    # every snapshot file that came from a batch file (directly or through a parent): the way back from a file
    "files": "version TEXT NOT NULL, path TEXT NOT NULL, kind TEXT, direct INTEGER, batch TEXT NOT NULL, "
    "batch_path TEXT, sha256 BLOB, source_sha256 BLOB",
}
FILE_TABLES = {
    "stamps": "src TEXT PRIMARY KEY, stamp TEXT NOT NULL",
    "loras": "src TEXT PRIMARY KEY, version TEXT, recipe TEXT, epoch INTEGER, steps INTEGER, model_hash TEXT, "
    "mlflow_run_id TEXT, manifest_root TEXT",
    "recommendations": "src TEXT PRIMARY KEY, version TEXT, recipe TEXT, epoch INTEGER, file TEXT, "
    "training_run_id TEXT",
}
TABLES = {**VERSION_TABLES, **FILE_TABLES}
INDEXES = (
    "parents(version)",
    "parents(parent)",
    "uses(batch)",
    "uses(version)",
    "files(batch, batch_path)",
    "files(sha256)",
    "files(source_sha256) WHERE source_sha256 IS NOT NULL",
    "files(version, path)",
    "loras(version, recipe)",
    "loras(model_hash)",
    "recommendations(version, recipe)",
)


def index_path(root: DataRoot) -> Path:
    return root.cache / INDEX_FILE


def _create(conn: sqlite3.Connection, indexes: bool = True) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
    for table, columns in TABLES.items():
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns})")
    for i, index in enumerate(INDEXES if indexes else ()):
        conn.execute(f"CREATE INDEX IF NOT EXISTS ix{i} ON {index}")
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA,))


def _connect(path: Path | str) -> sqlite3.Connection:
    """Autocommit mode: every write below is inside an explicit BEGIN IMMEDIATE ... COMMIT."""
    conn = sqlite3.connect(path, timeout=60, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 60000")
    return conn


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _delete(conn: sqlite3.Connection, src: str) -> None:
    """Drop the rows read from `src` (a version's seal: every row of the version)."""
    conn.execute("DELETE FROM stamps WHERE src = ?", (src,))
    kind, name, *_ = src.split("/")
    if kind == "datasets":
        for table in VERSION_TABLES:
            conn.execute(f"DELETE FROM {table} WHERE version = ?", (name,))
    else:
        conn.execute(f"DELETE FROM {'loras' if kind == 'loras' else 'recommendations'} WHERE src = ?", (src,))


def refresh(conn: sqlite3.Connection, root: DataRoot, version: str | None = None, recipe: str | None = None) -> int:
    """Bring the rows of a scope (everything, one version, or one version x recipe) up to date with the data
    root in one transaction; returns how many files were read again."""
    scope = scope_of(version, recipe)
    now = scan(root, scope)
    known = {}
    for prefix, _ in scope:
        known.update(
            conn.execute("SELECT src, stamp FROM stamps WHERE substr(src, 1, ?) = ?", (len(prefix), prefix)).fetchall()
        )
    changed = sorted(src for src, stamp in now.items() if known.get(src) != stamp)
    gone = sorted(set(known) - set(now))
    read = [(src, read_rows(root, src)) for src in changed]  # read before locking
    if not changed and not gone:
        return 0
    with _transaction(conn):
        for src in changed + gone:
            _delete(conn, src)
        for src, rows in read:
            conn.execute("INSERT INTO stamps VALUES (?, ?)", (src, now[src]))
            for table, values in rows.items():
                if values:
                    marks = ", ".join("?" * len(values[0]))
                    conn.executemany(f"INSERT INTO {table} VALUES ({marks})", values)
    return len(changed)


def _schema(conn: sqlite3.Connection) -> str | None:
    try:
        found = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    except sqlite3.DatabaseError:
        return None
    return found[0] if found else None


@contextmanager
def index_errors(root: DataRoot) -> Iterator[None]:
    """An SQLite error (a read-only data root, a damaged file, a lock held past the timeout) as one line naming
    the index."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        raise UserError(
            f"the lineage index cannot be used ({exc}); `lora-pipeline lineage --rebuild` derives it again",
            index_path(root),
        ) from None


def rebuild_index(root: DataRoot) -> int:
    """Derive the whole index again from the data root, into a new file renamed over the old one; returns how
    many files were read."""
    with index_errors(root):
        return _rebuild(root)


def _rebuild(root: DataRoot) -> int:
    final = index_path(root)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{INDEX_FILE}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        with closing(_connect(tmp)) as conn:
            # a new file, renamed into place only once whole: no journal, one fsync at the end
            conn.execute("PRAGMA journal_mode = OFF")
            conn.execute("PRAGMA synchronous = OFF")
            _create(conn, indexes=False)
            count = refresh(conn, root)
            _create(conn)  # the indexes, built once over all the rows
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def open_index(root: DataRoot, catch_up: bool = True) -> sqlite3.Connection:
    """The index of the data root, built when missing or of another schema; with `catch_up`, first brought up to
    date with every file written since it was last refreshed."""
    path = index_path(root)
    with index_errors(root):
        if path.is_file():
            conn = _connect(path)
            if _schema(conn) == SCHEMA:
                if catch_up:
                    refresh(conn, root)
                return conn
            conn.close()
        _rebuild(root)
        return _connect(path)


def update_index(root: DataRoot, version: str, recipe: str | None = None) -> int:
    """What an asset calls once it has written its files: re-read the version's seal, or the version x recipe's
    LoRA files and recommendation. Returns how many files were read. A missing index is started empty rather than
    derived whole here, so that an asset never fails on another version's files: a query catches up with them."""
    path = index_path(root)
    with index_errors(root):
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with closing(_connect(path)) as conn, _transaction(conn):
                _create(conn)
        with closing(open_index(root, catch_up=False)) as conn:
            return refresh(conn, root, version, recipe)


def index_rows(conn: sqlite3.Connection, versions: Iterable[str] = ()) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, sorted (to compare two indexes); with `versions`, only the rows about those
    versions (and no stamps)."""
    named = sorted(set(versions))
    out = {}
    for table in TABLES:
        if named and table == "stamps":
            continue
        where = f" WHERE version IN ({', '.join('?' * len(named))})" if named else ""
        out[table] = sorted(conn.execute(f"SELECT * FROM {table}{where}", named).fetchall(), key=repr)
    return out


def index_findings(root: DataRoot, versions: Sequence[str] = ()) -> list[str]:
    """What `verify` says of the index: one line per table whose rows are not the ones the data root gives
    (derived again in memory). No index yet is no finding: the next `lineage` builds it."""
    path = index_path(root)
    if not path.is_file():
        return []
    rebuild = "rebuild it with `lora-pipeline lineage --rebuild`"
    with index_errors(root), closing(_connect(path)) as conn:
        if _schema(conn) != SCHEMA:
            return [f"{path}: not a lineage index of this release; {rebuild}"]
        refresh(conn, root)  # files written since the last update are not a finding
        stored = index_rows(conn, versions)
    with closing(_connect(":memory:")) as fresh:
        _create(fresh)
        refresh(fresh, root)
        derived = index_rows(fresh, versions)
    findings = []
    for table, rows in derived.items():
        extra = (collections.Counter(stored[table]) - collections.Counter(rows)).total()
        lacking = (collections.Counter(rows) - collections.Counter(stored[table])).total()
        if extra or lacking:
            findings.append(
                f"{path}: table {table} has {extra} row(s) the data root does not give and lacks "
                f"{lacking}: the index was changed by hand; {rebuild}"
            )
    return findings
