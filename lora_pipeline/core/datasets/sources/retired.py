"""Retiring a batch, copy-only: `lora-pipeline retire batch:<id> --reason ...` takes a batch out of future versions
without touching a byte of it.

Each retirement and each `unretire` is a record (who, when, why) in the batch's append-only history
`governance/retired/<batch>.jsonl` (decisions.py); the last record says whether the batch is retired now. Batch
globs in specs and the sensors skip a retired batch; a spec that names one explicitly is refused (batches.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal, Protocol

from lora_pipeline.core.datasets.problems import Problem, problem
from lora_pipeline.core.datasets.sources.decisions import append_record, decision_file, now, read_records, who
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.names import is_name
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.schema import Record

KIND = "retired"


class RowWithOrigin(Protocol):
    """A manifest row as far as retirement goes: where it was copied from and the batch it first came from."""

    path: str
    origin_batch: str | None
    source_batch: str | None


def origin_of(row: RowWithOrigin) -> str | None:
    """The batch an image first entered the pipeline from (its rights and retirement are that batch's)."""
    return row.origin_batch or row.source_batch


class RetirementRecord(Record):
    """One line of `governance/retired/<batch>.jsonl`."""

    batch: str
    action: Literal["retire", "unretire"]
    reason: str
    recorded_at: str
    recorded_by: str

    @property
    def line(self) -> str:
        """`retired 2026-12-06T22:00:00+00:00 by alice: banned word in captions`."""
        verb = "retired" if self.action == "retire" else "unretired"
        return f"{verb} {self.recorded_at} by {self.recorded_by}: {self.reason}"


def retirement_history(root: DataRoot, batch: str) -> list[RetirementRecord]:
    """Every retire/unretire record of the batch, oldest first."""
    return read_records(decision_file(root, KIND, batch), RetirementRecord)


def retirement(root: DataRoot, batch: str) -> RetirementRecord | None:
    """The record that retired the batch when it is retired now, else None."""
    history = retirement_history(root, batch)
    return history[-1] if history and history[-1].action == "retire" else None


def is_retired(root: DataRoot, batch: str) -> bool:
    return retirement(root, batch) is not None


def retired_batches(root: DataRoot) -> dict[str, RetirementRecord]:
    """{batch: the record that retired it} of every batch retired now, sorted by batch id."""
    folder = root.governance / KIND
    if not folder.is_dir():
        return {}
    names = sorted(p.stem for p in folder.glob("*.jsonl") if is_name(p.stem))
    return {b: r for b in names if (r := retirement(root, b)) is not None}


def _record(root: DataRoot, batch: str, action: Literal["retire", "unretire"], reason: str) -> RetirementRecord:
    if not root.batch(batch).is_dir():
        raise UserError("batch folder not found", root.batch(batch))
    if not reason.strip():
        raise UserError(f"--reason must say why the batch is {action}d", decision_file(root, KIND, batch))
    current = retirement(root, batch)
    if action == "retire" and current is not None:
        raise UserError(f"batch '{batch}' is already {current.line}", decision_file(root, KIND, batch))
    if action == "unretire" and current is None:
        raise UserError(f"batch '{batch}' is not retired", decision_file(root, KIND, batch))
    record = RetirementRecord(
        batch=batch, action=action, reason=" ".join(reason.split()), recorded_at=now(), recorded_by=who()
    )
    return append_record(root, decision_file(root, KIND, batch), record)


def retire(root: DataRoot, batch: str, reason: str) -> RetirementRecord:
    """Retire the batch: later versions leave it out. Its files are not touched."""
    return _record(root, batch, "retire", reason)


def unretire(root: DataRoot, batch: str, reason: str) -> RetirementRecord:
    """Bring a retired batch back: globs and sensors take it again."""
    return _record(root, batch, "unretire", reason)


def retired_error(batch: str, record: RetirementRecord, where: Path) -> UserError:
    """The one line refusing a spec that names a retired batch."""
    return UserError(
        f"batch '{batch}' is {record.line}; take it out of sources or `lora-pipeline unretire batch:{batch}`",
        where,
    )


def retired_origin_problems(root: DataRoot, rows: Iterable[RowWithOrigin], version: str) -> list[Problem]:
    """An error for every image of a new version that first came from a batch retired now: an earlier version
    taken as a source (`dataset:`) still holds the retired batch's images. Found when the snapshot is built, so
    they stay part of what the version was built with."""
    retired = retired_batches(root)
    out = []
    for row in rows:
        batch = origin_of(row)
        if batch in retired and row.source_batch is None:
            message = (
                f"first came from batch '{batch}', {retired[batch].line}; leave it out of the dataset source "
                f"(exclude) or `lora-pipeline unretire batch:{batch}`"
            )
            out.append(problem(row.path, "retired_batch", "error", message, f"dataset:{version}"))
    return out
