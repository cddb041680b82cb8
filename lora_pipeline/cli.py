"""lora-pipeline: the command line, its arguments and how a command ends. Every run goes through the Dagster
instance so the UI sees it (cli_jobs.py: the commands that run a job; cli_records.py: those that run none).

A user error prints one line (`error: <file>: <problem>`) and exits 1; `--json` prints a
machine-readable result instead of the human summary.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from lora_pipeline.cli_jobs import (
    cmd_build,
    cmd_captions_import,
    cmd_demo,
    cmd_evaluate,
    cmd_intake,
    cmd_train,
    cmd_verify,
)
from lora_pipeline.cli_records import RUN_NO_JOB, Command, add_captions_export, add_record_commands, rights_options
from lora_pipeline.core.errors import UserError, one_line, printable
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.runtime import prepare_runtime


def _key_value_lines(data: dict[str, Any]) -> str:
    lines = []
    for key, value in data.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, indent=2, sort_keys=True)
        elif isinstance(value, bool) or value is None:  # true/false/null, as in the nested JSON
            value = json.dumps(value)
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lora-pipeline",
        description="Copy-only dataset versions, LoRA training and evaluation, run through the Dagster instance "
        "(make ui shows every run).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Command, help_text: str, within: Any = sub) -> argparse.ArgumentParser:
        sp = within.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--json", action="store_true", help="print a machine-readable JSON result")
        sp.set_defaults(fn=fn)
        return sp

    sp = add("intake", cmd_intake, "copy an external handoff into sources/ID (copy-only) and mark it _READY")
    sp.add_argument("src_dir", help="the folder of the handoff (only read)")
    sp.add_argument("--batch", required=True, help="the new batch id (a name): sources/ID")
    rights_options(sp)
    add_record_commands(add)
    sp = add("build", cmd_build, "snapshot + captions + report; exit 1 if a blocking check fails")
    sp.add_argument("version", help="the dataset version: specs/VERSION.yaml")
    for name, fn, help_text in (
        ("train", cmd_train, "train every epoch; refuses a dataset whose blocking checks failed"),
        ("evaluate", cmd_evaluate, "epoch x weight grid, validation loss, recommended epoch"),
    ):
        sp = add(name, fn, help_text)
        sp.add_argument("version", help="a built dataset version")
        sp.add_argument("--recipe", required=True, help="the recipe name: recipes/NAME.yaml")
    sp = add("verify", cmd_verify, "re-hash snapshots against their manifests; exit 1 on any mismatch")
    sp.add_argument("version", nargs="?", help="one dataset version (default: every built one)")
    add("demo", cmd_demo, "the whole chain on the bundled sample data and the tiny base model")
    review = "captions reviewed by people: a version's captions to a CSV, and the edited CSV back as a caption batch"
    actions = sub.add_parser("captions", help=review, description=review).add_subparsers(dest="action", required=True)
    add_captions_export(add, actions)
    sp = add("import", cmd_captions_import, "the edited captions as a new caption batch and the spec layering it",
             actions)
    sp.add_argument("csv", help="a CSV written by `captions export`, its caption column edited")
    sp.add_argument("--batch", required=True, help="the new caption batch id (a name): sources/ID")
    return p


def _os_error_line(exc: OSError) -> str:
    """`<file>: <what the system said>` for an operating-system error (disk full, read-only, permission)."""
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return one_line(exc)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    if args.json:
        print(json.dumps({"ok": False, "error": message}))
    else:
        print(f"error: {printable(message)}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input and operating-system errors print one line and exit 1; Ctrl-C and SIGTERM
    print one line and exit 130, after the clean-up on the way out has run (staging folders removed).

    SIGTERM is handled like Ctrl-C (a KeyboardInterrupt), as Dagster itself does while a run executes, so
    that a plain `kill` does not skip the clean-up either.
    """
    prepare_runtime()
    args = parser().parse_args(argv)
    previous_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        root = DataRoot.from_env()  # a bad setting (environment variable) is a UserError line too
        if args.fn not in RUN_NO_JOB:  # the others record a run: the instance must answer first
            from lora_pipeline.runs.postgres import require_instance_database

            require_instance_database()
        result = args.fn(args, root)
    except UserError as exc:
        return _fail(args, str(exc), 1)
    except OSError as exc:
        return _fail(args, _os_error_line(exc), 1)
    except KeyboardInterrupt:
        return _fail(args, "interrupted (Ctrl-C or SIGTERM); run the command again to finish", 130)
    finally:
        signal.signal(signal.SIGTERM, previous_term)
    if args.json:
        print(json.dumps(result.data, indent=2, sort_keys=True, default=str))
    else:
        text = result.text if result.text is not None else _key_value_lines(result.data)
        print(printable(text, keep="\n\t"))  # file names, captions and header values are untrusted text
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
