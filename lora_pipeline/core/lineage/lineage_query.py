"""`lora-pipeline lineage TARGET`: the chain up and down from a batch, a source file, a version or a LoRA file.

Down from a batch or a file: the versions that took it, directly or through a parent version (a `dataset:`
source, a deliberate merge among them), and every training of those versions: LoRA files, MLflow runs and the
recommended epoch. Up from a version or a LoRA file: the batches, with how many files came from each, and the
parent versions. Everything is read from the lineage index (lineage_index.py), caught up with the data root first.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Collection
from contextlib import closing
from pathlib import Path
from typing import Any

from lora_pipeline.core.datasets.sources.retired import retired_batches
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.lineage.lineage_index import index_errors, open_index
from lora_pipeline.core.lineage.lineage_sources import lora_header
from lora_pipeline.core.names import closest_names, require_name
from lora_pipeline.core.paths import DataRoot

SHA256_RE = re.compile(r"[0-9a-f]{64}")
TARGETS = "batch:<id>, file:<path or sha256>, version:<name> or lora:<file>"
VERSION_COLUMNS = ("version", "intent", "merge", "images", "passed", "errors", "first_error", "manifest_root")


def _marks(values: Collection[Any]) -> str:
    return ", ".join("?" * len(values))


def _version(conn: sqlite3.Connection, version: str) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {', '.join(VERSION_COLUMNS)} FROM versions WHERE version = ?", (version,)).fetchone()
    if row is None:
        return None
    info = dict(zip(VERSION_COLUMNS, row, strict=True))
    info.update(merge=bool(info["merge"]), passed=bool(info["passed"]), parents=_parents(conn, version))
    return info


def _parents(conn: sqlite3.Connection, version: str) -> list[str]:
    return [p for (p,) in conn.execute("SELECT parent FROM parents WHERE version = ? ORDER BY parent", (version,))]


def _walk(conn: sqlite3.Connection, start: str, sql: str) -> list[str]:
    """Every version reached from `start` by repeating `sql` (parents: up; children: down), nearest first."""
    seen, frontier = [start], [start]
    while frontier:
        nxt = [v for f in frontier for (v,) in conn.execute(sql, (f,)) if v not in seen]
        nxt = sorted(set(nxt))
        seen += nxt
        frontier = nxt
    return seen[1:]


def _how(conn: sqlite3.Connection, version: str, direct: bool, among: Collection[str]) -> dict[str, Any]:
    """How `version` came to hold something: `direct`ly from the batch, and/or `through` the parents that held it."""
    info = _version(conn, version) or {}
    through = [p for p in info.get("parents", []) if p in among]
    return {**info, "direct": direct, "through": through}


def _trainings(conn: sqlite3.Connection, versions: Collection[str]) -> list[dict[str, Any]]:
    """Per version x recipe of `versions`: the LoRA files (epochs), MLflow runs and the recommended epoch."""
    names = sorted(versions)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for version, recipe, epoch, src, run in conn.execute(
        f"SELECT version, recipe, epoch, src, mlflow_run_id FROM loras WHERE version IN ({_marks(names)}) "
        "ORDER BY version, recipe, epoch, src",
        names,
    ):
        item = out.setdefault(
            (version, recipe), {"version": version, "recipe": recipe, "epochs": [], "files": [], "mlflow_run_ids": []}
        )
        if epoch is not None and epoch not in item["epochs"]:
            item["epochs"].append(epoch)
        item["files"].append(src)
        if run and run not in item["mlflow_run_ids"]:
            item["mlflow_run_ids"].append(run)
    for version, recipe, epoch, file, run in conn.execute(
        f"SELECT version, recipe, epoch, file, training_run_id FROM recommendations WHERE version IN ({_marks(names)})",
        names,
    ):
        item = out.setdefault(
            (version, recipe),
            {"version": version, "recipe": recipe, "epochs": [], "files": [], "mlflow_run_ids": [run] if run else []},
        )
        item.update(recommended_epoch=epoch, recommended_file=file)
    return [out[key] for key in sorted(out)]


def _upstream(conn: sqlite3.Connection, version: str) -> dict[str, Any]:
    """The batches a version took files from (direct and inherited counts) and its ancestor versions."""
    batches = [
        {"batch": b, "direct": d, "inherited": i, "images": n}
        for b, d, i, n in conn.execute(
            "SELECT batch, direct, inherited, images FROM uses WHERE version = ? ORDER BY batch", (version,)
        )
    ]
    ancestors = [
        _version(conn, v) or {"version": v, "missing": True}
        for v in _walk(conn, version, "SELECT parent FROM parents WHERE version = ?")
    ]
    return {"batches": batches, "ancestors": ancestors}


def by_batch(conn: sqlite3.Connection, root: DataRoot, batch: str) -> dict[str, Any]:
    require_name(batch, "batch id")
    uses = conn.execute(
        "SELECT version, direct, inherited, images FROM uses WHERE batch = ? ORDER BY version", (batch,)
    ).fetchall()
    ready = root.ready_batches()
    if not uses and batch not in ready:
        known = [b for (b,) in conn.execute("SELECT DISTINCT batch FROM uses")]
        raise UserError(
            f"batch '{batch}' is neither a ready batch nor in the lineage index{closest_names(batch, known + ready)}",
            root.batch(batch),
        )
    using = {v for v, *_ in uses}
    versions = [{**_how(conn, v, d > 0, using if i else ()), "files": d + i, "images": n} for v, d, i, n in uses]
    return {"query": f"batch:{batch}", "batch": batch, "versions": versions, "trainings": _trainings(conn, using)}


def _batch_file(conn: sqlite3.Connection, root: DataRoot, value: str) -> tuple[str, str]:
    """(batch, path inside it) of a `file:` target: an existing file under sources/ or datasets/ of the data root,
    or `<batch>/<path>` as manifests name source files (a file that is gone can still be asked about)."""
    path = Path(value).expanduser()
    if path.is_file():
        real = path.resolve()
        for folder in (root.sources, root.datasets):
            try:
                parts = real.relative_to(folder.resolve()).parts
            except ValueError:
                continue
            if folder == root.sources:
                return parts[0], "/".join(parts[1:])
            row = conn.execute(
                "SELECT batch, batch_path FROM files WHERE version = ? AND path = ?", (parts[0], "/".join(parts[1:]))
            ).fetchone()
            if row is None:
                raise UserError("is not a file of an indexed dataset version that came from a batch", path)
            return row
        raise UserError(f"is neither under {root.sources} nor under {root.datasets}", path)
    batch, _, rest = value.partition("/")
    if path.is_absolute() or not rest:
        raise UserError("no such file; name an existing file, <batch>/<path> or a sha256", value)
    return require_name(batch, "batch id"), rest


def by_file(conn: sqlite3.Connection, root: DataRoot, value: str) -> dict[str, Any]:
    columns = "version, path, kind, direct, batch, batch_path, sha256"
    if SHA256_RE.fullmatch(value.lower()):
        what: dict[str, Any] = {"sha256": value.lower()}
        digest = bytes.fromhex(value)
        rows = conn.execute(
            f"SELECT {columns} FROM files WHERE sha256 = ? OR source_sha256 = ? ORDER BY version, path",
            (digest, digest),
        ).fetchall()
    else:
        batch, rel = _batch_file(conn, root, value)
        what = {"batch": batch, "path": rel}
        rows = conn.execute(
            f"SELECT {columns} FROM files WHERE batch = ? AND batch_path = ? ORDER BY version, path", (batch, rel)
        ).fetchall()
    if not rows:
        raise UserError("no dataset version in the lineage index took this file", value)
    holding = {r[0] for r in rows}
    versions = [
        {
            **_how(conn, v, bool(d), () if d else holding),
            "path": p,
            "kind": k,
            "batch": b,
            "batch_path": bp,
            "sha256": s.hex(),
        }
        for v, p, k, d, b, bp, s in rows
    ]
    return {"query": f"file:{value}", "file": what, "versions": versions, "trainings": _trainings(conn, holding)}


def _require_version(conn: sqlite3.Connection, root: DataRoot, version: str) -> dict[str, Any]:
    info = _version(conn, require_name(version, "dataset version"))
    if info is None:
        known = [v for (v,) in conn.execute("SELECT version FROM versions")]
        raise UserError(
            f"dataset version '{version}' is not in the lineage index (not built, or not sealed yet)"
            f"{closest_names(version, known)}",
            root.dataset(version),
        )
    return info


def by_version(conn: sqlite3.Connection, root: DataRoot, version: str) -> dict[str, Any]:
    info = _require_version(conn, root, version)
    down = _walk(conn, version, "SELECT version FROM parents WHERE parent = ?")
    return {
        "query": f"version:{version}",
        "version": info,
        **_upstream(conn, version),
        "descendants": [_version(conn, v) for v in down],
        "trainings": _trainings(conn, {version, *down}),
    }


def by_lora(conn: sqlite3.Connection, root: DataRoot, value: str) -> dict[str, Any]:
    """A LoRA file under loras/ is found by its path; a copy elsewhere by the tensor hash in its header."""
    path = Path(value).expanduser()
    columns = ("file", "version", "recipe", "epoch", "steps", "model_hash", "mlflow_run_id", "manifest_root")
    sql = f"SELECT {', '.join(('src', *columns[1:]))} FROM loras WHERE "
    try:
        src = path.resolve().relative_to(root.root.resolve()).as_posix()
    except ValueError:
        src = None
    row = conn.execute(sql + "src = ?", (src,)).fetchone() if src else None
    if row is None and path.is_file():
        model_hash = lora_header(path).get("sshs_model_hash")
        row = conn.execute(sql + "model_hash = ? ORDER BY src", (model_hash,)).fetchone() if model_hash else None
    if row is None:
        why = (
            "not a LoRA file in the lineage index (trained into another data root?)"
            if path.is_file()
            else "file not found"
        )
        raise UserError(why, path)
    lora = dict(zip(columns, row, strict=True))
    training = _trainings(conn, {lora["version"]})
    rec = next((t for t in training if t["recipe"] == lora["recipe"]), {})
    lora["recommended_epoch"] = rec.get("recommended_epoch")
    return {
        "query": f"lora:{value}",
        "lora": lora,
        "version": _require_version(conn, root, lora["version"]),
        **_upstream(conn, lora["version"]),
    }


QUERIES: dict[str, Callable[[sqlite3.Connection, DataRoot, str], dict[str, Any]]] = {
    "batch": by_batch,
    "file": by_file,
    "version": by_version,
    "lora": by_lora,
}


def _answer_versions(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """Every version and training entry of an answer (each carries a `version` name)."""
    found = [*answer.get("versions", []), *answer.get("ancestors", []), *answer.get("descendants", [])]
    found += [*answer.get("trainings", []), *[answer[k] for k in ("version", "lora") if k in answer]]
    return [item for item in found if item]


def _flag_retired(conn: sqlite3.Connection, root: DataRoot, answer: dict[str, Any]) -> dict[str, Any]:
    """Flag what a retired batch touches (issue 24): `retired` maps each retired batch the answer involves to its
    record (who, when, why); every version, training and LoRA entry gets `retired_batches`, the retired batches it
    was built on (directly or through earlier versions), and each upstream batch its `retired` record or None."""
    retired = retired_batches(root)
    entries = _answer_versions(answer)
    names = sorted({e["version"] for e in entries})
    built_on: dict[str, list[str]] = {}
    if retired and names:
        for version, batch in conn.execute(
            f"SELECT version, batch FROM uses WHERE version IN ({_marks(names)}) AND batch IN ({_marks(retired)}) "
            "ORDER BY version, batch",
            [*names, *retired],
        ):
            built_on.setdefault(version, []).append(batch)
    for entry in entries:
        entry["retired_batches"] = built_on.get(entry["version"], [])
    for batch in answer.get("batches", []):
        batch["retired"] = retired[batch["batch"]].to_json_dict() if batch["batch"] in retired else None
    involved = {b for e in entries for b in e["retired_batches"]}
    involved |= {b for b in (answer.get("batch"), answer.get("file", {}).get("batch")) if b in retired}
    answer["retired"] = {b: retired[b].to_json_dict() for b in sorted(involved)}
    return answer


def lineage(root: DataRoot, target: str) -> dict[str, Any]:
    """The answer to `lineage TARGET` (see the module docstring); a one-line UserError for an unknown target."""
    kind, sep, value = target.partition(":")
    if not sep or kind not in QUERIES or not value:
        raise UserError(f"'{target}' is not a lineage target: give {TARGETS}")
    with closing(open_index(root)) as conn, index_errors(root):
        return _flag_retired(conn, root, QUERIES[kind](conn, root, value))
