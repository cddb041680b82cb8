"""Rights per batch: under which rights a batch's images may be used for training.

A batch gets its rights at intake (`lora-pipeline intake --rights ...`), from a `_RIGHTS.yaml` beside `_READY`
(for batches that land by sensor), or later with `lora-pipeline rights batch:<id> --rights ...`. Each is a
record in the batch's append-only history `governance/rights/<batch>.jsonl` (decisions.py): the last record
is in force, and a batch with none is `unknown`. `_RIGHTS.yaml` is only read: a file whose bytes the history
does not hold yet becomes a new record the next time the batch's rights are asked for.

A snapshot keeps the rights in force when it was built (snapshot.json `rights`, and `rights` on the image rows
of its manifest, for the batches that had a record): a later record changes what later versions get, never what
an earlier one was built with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass

from lora_pipeline.core.datasets.sources.decisions import append_record, decision_file, now, read_records, who
from lora_pipeline.core.datasets.sources.regular_files import NotRegularFile, is_regular
from lora_pipeline.core.datasets.sources.retired import RowWithOrigin, origin_of
from lora_pipeline.core.datasets.spec import Rights
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_file
from lora_pipeline.core.paths import RIGHTS_FILE, DataRoot
from lora_pipeline.core.schema import CONFIG, Record, Text, validate
from lora_pipeline.core.yamlfile import load_yaml_mapping

UNKNOWN = "unknown"
RecordSource = Literal["intake", "command", "_RIGHTS.yaml"]


@dataclass(frozen=True, config=CONFIG)
class RightsDeclaration:
    """What `_RIGHTS.yaml` (or intake's `--rights/--licence/--holder`) says about a batch."""

    rights: Rights = Field(description="owned | licensed | public-domain | unknown")
    licence: Text | None = Field(None, description="the licence: an SPDX id or a URL (required for `licensed`)")
    holder: Text | None = Field(None, description="who holds the rights (a person, team or company)")

    @model_validator(mode="before")
    @classmethod
    def _american_spelling(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "license" in data and "licence" not in data:
            data = {("licence" if k == "license" else k): v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _licence_for_licensed(self) -> RightsDeclaration:
        if self.rights == "licensed" and not (self.licence or "").strip():
            raise ValueError("rights 'licensed' needs a licence (an SPDX id such as CC-BY-4.0, or a URL)")
        return self


class RightsRecord(Record):
    """One line of `governance/rights/<batch>.jsonl`."""

    batch: str
    rights: Rights
    licence: str | None = None
    holder: str | None = None
    recorded_at: str
    recorded_by: str
    source: RecordSource
    file_sha256: str | None = None  # of the _RIGHTS.yaml it was read from
    reason: str | None = None


class BatchRights(Record):
    """A batch's rights as in force at one moment; `record` is how many records its history held then (0: none,
    so `unknown`), which tells a later reader whether the rights changed since."""

    rights: Rights
    licence: str | None = None
    holder: str | None = None
    record: int = 0

    def same_terms(self, other: BatchRights) -> bool:
        return (self.rights, self.licence, self.holder) == (other.rights, other.licence, other.holder)

    @property
    def label(self) -> str:
        """`licensed (CC-BY-4.0; holder Jane Doe)`, `owned`, `unknown`."""
        extra = "; ".join(x for x in (self.licence, f"holder {self.holder}" if self.holder else None) if x)
        return f"{self.rights} ({extra})" if extra else self.rights


def declaration(rights: str, licence: str | None, holder: str | None) -> RightsDeclaration:
    """The command line's `--rights/--licence/--holder` as a declaration (a one-line UserError when invalid)."""
    data = {k: v for k, v in (("rights", rights), ("licence", licence), ("holder", holder)) if v is not None}
    return validate(RightsDeclaration, data, Path("--rights"))


def load_rights_file(path: Path) -> RightsDeclaration:
    """A `_RIGHTS.yaml` as a declaration; one-line UserError naming the file when it is not one."""
    if not is_regular(path):
        raise NotRegularFile(path, "symlink_not_followed" if path.is_symlink() else "not_a_regular_file")
    return validate(RightsDeclaration, load_yaml_mapping(path), path)


def rights_history(root: DataRoot, batch: str) -> list[RightsRecord]:
    """Every rights record of the batch, oldest first."""
    return read_records(decision_file(root, "rights", batch), RightsRecord)


def record_rights(
    root: DataRoot,
    batch: str,
    decl: RightsDeclaration,
    source: RecordSource,
    reason: str | None = None,
    file_sha256: str | None = None,
) -> RightsRecord:
    """Append a rights record for the batch (the batch folder must exist)."""
    if not root.batch(batch).is_dir():
        raise UserError("batch folder not found", root.batch(batch))
    values: dict[str, Any] = {
        "batch": batch,
        "rights": decl.rights,
        "recorded_at": now(),
        "recorded_by": who(),
        "source": source,
    }
    values |= {
        k: v
        for k, v in (
            ("licence", decl.licence),
            ("holder", decl.holder),
            ("file_sha256", file_sha256),
            ("reason", reason),
        )
        if v
    }
    return append_record(root, decision_file(root, "rights", batch), RightsRecord(**values))


def sync_rights_file(root: DataRoot, batch: str) -> RightsRecord | None:
    """Record the batch's `_RIGHTS.yaml` when its bytes are not in the history yet; the new record, or None."""
    path = root.batch(batch) / RIGHTS_FILE
    if not (path.exists() or path.is_symlink()):
        return None
    decl = load_rights_file(path)
    digest = sha256_file(path)
    if any(r.file_sha256 == digest for r in rights_history(root, batch)):
        return None
    return record_rights(root, batch, decl, "_RIGHTS.yaml", file_sha256=digest)


def _in_force(history: list[RightsRecord], upto: int | None = None) -> BatchRights:
    records = history if upto is None else history[:upto]
    if not records:
        return BatchRights(rights=UNKNOWN, record=0)
    last = records[-1]
    values = {k: v for k, v in (("licence", last.licence), ("holder", last.holder)) if v}
    return BatchRights(rights=last.rights, record=len(records), **values)


def batch_rights(root: DataRoot, batch: str) -> BatchRights:
    """The rights in force for the batch now (its `_RIGHTS.yaml` recorded first when it is new)."""
    if root.batch(batch).is_dir():
        sync_rights_file(root, batch)
    return _in_force(rights_history(root, batch))


def rights_change_since(root: DataRoot, batch: str, at_build: BatchRights) -> tuple[BatchRights, RightsRecord | None]:
    """(the rights in force now, the first record after `at_build` whose terms differ from it, or None)."""
    history = rights_history(root, batch)
    for n in range(at_build.record + 1, len(history) + 1):
        if not _in_force(history, n).same_terms(at_build):
            return _in_force(history), history[n - 1]
    return _in_force(history), None


def rights_for_rows(root: DataRoot, rows: Iterable[RowWithOrigin]) -> dict[str, BatchRights]:
    """{batch: its rights now} of the batches the rows' images first came from that have a record, sorted by
    batch; a batch without one is unknown, as every batch was before rights were recorded."""
    batches = sorted({b for row in rows if (b := origin_of(row))})
    return {b: terms for b in batches if (terms := batch_rights(root, b)).record}


def given_rights(rights: str | None, licence: str | None, holder: str | None) -> RightsDeclaration | None:
    """The command line's `--rights/--licence/--holder` as a declaration, None without `--rights`."""
    if rights is not None:
        return declaration(rights, licence, holder)
    if licence is not None or holder is not None:
        raise UserError("--licence and --holder need --rights (owned | licensed | public-domain | unknown)")
    return None


def intake_rights(
    src_dir: Path, rights: str | None, licence: str | None, holder: str | None
) -> tuple[RightsDeclaration | None, str | None]:
    """(the declaration intake records, the sha256 of the file it came from): the command line's `--rights`, else
    the handoff's own `_RIGHTS.yaml`, else none (the batch's rights stay unknown). Checked before anything is
    copied, so a bad declaration costs no copy."""
    given = given_rights(rights, licence, holder)
    path = src_dir / RIGHTS_FILE
    if given is not None or not (path.exists() or path.is_symlink()):
        return given, None
    return load_rights_file(path), sha256_file(path)


def rights_report(root: DataRoot, batch: str) -> tuple[dict[str, Any], str]:
    """(JSON data, text) of `lora-pipeline rights`: the rights in force and every record."""
    if not root.batch(batch).is_dir():
        raise UserError("batch folder not found", root.batch(batch))
    current = batch_rights(root, batch)
    history = rights_history(root, batch)
    lines = [f"batch {batch}: {current.label}" + ("" if history else " (no record)")]
    lines += [
        f"  {r.recorded_at} by {r.recorded_by} ({r.source}): {_in_force([r]).label}"
        + (f"; {r.reason}" if r.reason else "")
        for r in history
    ]
    data = {"batch": batch, "rights": current.to_json_dict(), "history": [r.to_json_dict() for r in history]}
    return data, "\n".join(lines)
