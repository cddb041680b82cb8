"""The commands that run no Dagster job: `provenance`, `diff` and `lineage` read the data root (and the lineage
index), `rights`, `retire` / `unretire` append a record under governance/, `captions export` writes a CSV; and the
result every command of cli.py and cli_jobs.py hands back."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import DataRoot


@dataclass(frozen=True)
class CommandResult:
    """What a command hands back: `data` is what `--json` prints, `text` what a person reads (default: one
    `key: value` line per entry of `data`), `exit_code` the process's exit status."""

    data: dict[str, Any]
    text: str | None = None
    exit_code: int = 0


Command = Callable[[argparse.Namespace, DataRoot], CommandResult]
Add = Callable[..., argparse.ArgumentParser]  # cli.parser's `add(name, fn, help_text[, within])`


def cmd_rights(args: argparse.Namespace, root: DataRoot) -> CommandResult:
    """Show a batch's rights and their history; with --rights, first append a new record (never an edit)."""
    from lora_pipeline.core.datasets.sources.decisions import batch_ref
    from lora_pipeline.core.datasets.sources.rights import given_rights, record_rights, rights_report

    batch = batch_ref(args.batch)
    if (declared := given_rights(args.rights, args.licence, args.holder)) is not None:
        record_rights(root, batch, declared, "command", args.reason)
    return CommandResult(*rights_report(root, batch))


def cmd_retire(args: argparse.Namespace, root: DataRoot) -> CommandResult:
    """Retire (or with `unretire`, bring back) a batch: a record, never a change to its files."""
    from lora_pipeline.core.datasets.sources.decisions import batch_ref
    from lora_pipeline.core.datasets.sources.retired import retire, unretire
    from lora_pipeline.core.lineage.source_flags import retirement_report

    record = (retire if args.command == "retire" else unretire)(root, batch_ref(args.batch), args.reason)
    return CommandResult(*retirement_report(root, record))


def cmd_provenance(args: argparse.Namespace, root: DataRoot) -> CommandResult:
    from lora_pipeline.core.lineage.provenance import trace_lora
    from lora_pipeline.core.lineage.provenance_text import batch_summary, format_with_summary

    chain = trace_lora(root, Path(args.file))
    exit_code = 0 if chain.status == "ok" else 1
    data = {**chain.to_json_dict(), "batch_summary": batch_summary(chain)}
    return CommandResult(data, text=format_with_summary(chain, files=args.files), exit_code=exit_code)


def cmd_lineage(args: argparse.Namespace, root: DataRoot) -> CommandResult:
    """Reads (and brings up to date) the lineage index only: no Dagster run, like `provenance`."""
    from lora_pipeline.core.lineage.lineage_index import index_path, rebuild_index
    from lora_pipeline.core.lineage.lineage_query import TARGETS, lineage
    from lora_pipeline.core.lineage.lineage_text import format_lineage

    if args.rebuild:
        started = time.monotonic()
        files = rebuild_index(root)
        data = {"index": str(index_path(root)), "files_read": files, "seconds": round(time.monotonic() - started, 2)}
        if not args.target:
            return CommandResult(data)
    if not args.target:
        raise UserError(f"name what to trace: {TARGETS}")
    data = lineage(root, args.target)
    return CommandResult(data, text=format_lineage(data))


def cmd_diff(args: argparse.Namespace, root: DataRoot) -> CommandResult:
    from lora_pipeline.core.lineage.diff import diff_versions
    from lora_pipeline.core.lineage.diff_text import diff_markdown

    diff = diff_versions(root, args.old, args.new)
    return CommandResult(diff.to_json_dict(), text=diff_markdown(diff).rstrip("\n"))


def cmd_captions_export(args: argparse.Namespace, root: DataRoot) -> CommandResult:
    from lora_pipeline.core.datasets.captions.review_io import export_captions

    result = export_captions(root, args.version, Path(args.to or f"captions-{args.version}.csv"))
    return CommandResult({"version": args.version, "csv": str(result.csv), "thumbnails": str(result.thumbnails),
                          "rows": result.rows})


def rights_options(sp: argparse.ArgumentParser) -> None:
    from typing import get_args

    from lora_pipeline.core.datasets.spec import Rights

    sp.add_argument("--rights", choices=get_args(Rights), help="under which rights the images may be used for training "
                    "(intake's default: the handoff's _RIGHTS.yaml, else none recorded: unknown)")
    sp.add_argument("--licence", help="the licence: an SPDX id or a URL (required with --rights licensed)")
    sp.add_argument("--holder", help="who holds the rights")


def add_record_commands(add: Add) -> None:
    """The parsers of rights, retire, unretire, provenance, diff and lineage."""
    sp = add("rights", cmd_rights, "a batch's rights and their history; with --rights, record new rights")
    sp.add_argument("batch", help="batch:<id>")
    rights_options(sp)
    sp.add_argument("--reason", help="why the rights change (kept in the record)")
    for name, help_text in (("retire", "take a batch out of future versions (a record; its files stay as they are)"),
                            ("unretire", "bring a retired batch back into globs and sensors (a record)")):
        sp = add(name, cmd_retire, help_text)
        sp.add_argument("batch", help="batch:<id>")
        sp.add_argument("--reason", required=True, help="why (kept in the record with who and when)")
    sp = add("provenance", cmd_provenance, "the chain from a LoRA file back to its source files; exit 1 on a finding")
    sp.add_argument("file", help="a LoRA .safetensors file")
    sp.add_argument("--files", action="store_true", help="also print every image with its caption and source files")
    sp = add("diff", cmd_diff, "what changed from one dataset version to another: images added, removed, replaced, "
             "captions (word diff), per-batch counts, spec fields")
    sp.add_argument("old", help="a built dataset version")
    sp.add_argument("new", help="another built dataset version")
    sp = add("lineage", cmd_lineage, "which versions, LoRA files, runs and recommendations a batch, file, version or "
             "LoRA file belongs to, up and down (from the lineage index)")
    sp.add_argument("target", nargs="?", help="batch:<id>, file:<path or sha256>, version:<name> or lora:<file>")
    sp.add_argument("--rebuild", action="store_true", help="derive the lineage index again from the data root first")


def add_captions_export(add: Add, actions: Any) -> None:
    sp = add("export", cmd_captions_export, "one CSV row per image (caption, source, findings, thumbnail)", actions)
    sp.add_argument("version", help="a built, sealed dataset version")
    sp.add_argument("--to", help="the CSV to write (default captions-VERSION.csv); never overwritten")


# Commands that never start a Dagster run, so they need no instance database (provenance, diff and lineage read
# the data root only).
RUN_NO_JOB = (cmd_provenance, cmd_diff, cmd_lineage)
