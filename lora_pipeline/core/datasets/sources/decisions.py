"""Append-only records of decisions about source batches (their rights, their retirement) under `governance/`.

A decision is never edited in place: a change is a new line, so the history of every batch stays readable. An
append reads the file, checks every line, and writes the old bytes plus the new line through a temp file and a
rename, under one lock: a reader never sees half a line and two writers never lose one. The files are written
read-only, a reminder that they are history.
"""

from __future__ import annotations

import getpass
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_bytes
from lora_pipeline.core.locks import exclusive_lock
from lora_pipeline.core.names import require_name
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.schema import Record, error_line

R = TypeVar("R", bound=Record)


def who() -> str:
    """The user recording a decision: the login name, else $USER, else "unknown"."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or "unknown"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def decision_file(root: DataRoot, kind: str, batch: str) -> Path:
    """`governance/<kind>/<batch>.jsonl`; the batch id is checked to be one safe name."""
    return root.governance / kind / f"{root.batch(batch).name}.jsonl"


def read_records(path: Path, kind: type[R]) -> list[R]:
    """Every record of an append-only file, oldest first ([] when there is none); a line that is not a `kind`
    is a one-line UserError naming the file and the line."""
    if not path.is_file():
        return []
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(kind.model_validate_json(line))
            except ValidationError as exc:
                raise UserError(f"line {lineno}: {error_line(exc)}", path) from None
    return records


def append_record(root: DataRoot, path: Path, record: R) -> R:
    """Add `record` as the last line of `path`; the lines before it stay byte for byte what they were."""
    with exclusive_lock(root.governance / ".lock"):
        read_records(path, type(record))  # a damaged history is refused, never extended
        old = path.read_bytes() if path.is_file() else b""
        atomic_write_bytes(
            path, old + record.model_dump_json(by_alias=True, exclude_unset=True).encode() + b"\n", readonly=True
        )
    return record


def batch_ref(text: str) -> str:
    """The batch id of `batch:<id>` (or of a bare id) on the command line; a one-line UserError otherwise."""
    kind, sep, name = text.partition(":")
    if sep and kind != "batch":
        raise UserError(f"'{text}' is not batch:<id> (only batches are governed this way)")
    return require_name(name if sep else text, "batch id")
