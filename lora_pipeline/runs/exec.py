"""`python -m lora_pipeline.runs.exec [--postgres URL] -- COMMAND...`: what every process of the cluster profile
runs (README, "Running on several machines"; deploy/cluster/). One line and exit 1, before COMMAND starts, when
the arguments are not of that form, COMMAND is not found, a variable that the instance's dagster.yaml or a YAML
file named on COMMAND's line reads (`env: NAME`) is unset, or the database (default the instance's,
$LORA_PIPELINE_DAGSTER_PG_URL) does not answer; else become COMMAND (the daemon, the webserver, a Celery worker,
the MLflow server)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.settings import settings
from lora_pipeline.core.yamlfile import load_yaml_mapping
from lora_pipeline.runs.postgres import require_postgres

USAGE = "usage: python -m lora_pipeline.runs.exec [--postgres URL] -- COMMAND..."


def checked(argv: list[str], database: str | None = None) -> list[str]:
    """`argv` behind the checks of this module: the database (default the instance's) must answer."""
    check = ["--postgres", database] if database else []
    return [sys.executable, "-m", "lora_pipeline.runs.exec", *check, "--", *argv]


def parse(args: list[str]) -> tuple[str | None, list[str]]:
    """(database or None, command) of `[--postgres URL] -- COMMAND...`; UserError for anything else."""
    if "--" not in args:
        raise UserError(f"no `--` before the command ({USAGE})")
    cut = args.index("--")
    options, command = args[:cut], args[cut + 1:]
    if not command:
        raise UserError(f"no command after `--` ({USAGE})")
    if not options:
        return None, command
    if options[0] != "--postgres":
        raise UserError(f"unknown option {options[0]!r} ({USAGE})")
    if len(options) != 2 or not options[1].strip():
        raise UserError(f"--postgres needs one database URL ({USAGE})")
    return options[1], command


def _env_references(config: Any) -> Iterator[str]:
    """The variable names of the `{env: NAME}` values in a parsed Dagster or Celery YAML config."""
    if isinstance(config, dict):
        if set(config) == {"env"} and isinstance(config["env"], str):
            yield config["env"]
        for value in config.values():
            yield from _env_references(value)
    elif isinstance(config, list):
        for value in config:
            yield from _env_references(value)


def config_files(command: list[str]) -> list[Path]:
    """The YAML configs the command reads: $DAGSTER_HOME/dagster.yaml and the YAML files on its line."""
    files = [Path(arg) for arg in command[1:] if arg.endswith((".yaml", ".yml")) and Path(arg).is_file()]
    if home := os.environ.get("DAGSTER_HOME"):
        instance_config = Path(home) / "dagster.yaml"
        if instance_config.is_file():
            files.insert(0, instance_config)
    return files


def require_variables(command: list[str]) -> None:
    """UserError naming the config and the variable, for the first `env:` variable a config reads that is unset."""
    for path in config_files(command):
        for name in _env_references(load_yaml_mapping(path)):
            if not os.environ.get(name, "").strip():
                raise UserError(f"reads ${name}, which is not set (deploy/cluster/env.sh sets it)", path)


def prepare(args: list[str]) -> tuple[str, list[str]]:
    """(executable, command) of `[--postgres URL] -- COMMAND...` once every check of the module doc passed."""
    database, command = parse(args)
    executable = shutil.which(command[0])
    if executable is None:
        raise UserError(f"command not found: {command[0]!r}")
    require_variables(command)
    database = database or settings().dagster_pg_url
    if database:
        require_postgres(database)
    return executable, command


def exec_checked(args: list[str]) -> int:
    """Check `[--postgres URL] -- COMMAND...` (`prepare`), then replace this process with COMMAND."""
    executable, command = prepare(args)
    try:
        os.execv(executable, command)
    except OSError as exc:  # e.g. a file that is not a program
        raise UserError(f"cannot run {command[0]!r}: {exc.strerror}") from None
    return 1  # not reached


def main(argv: list[str] | None = None) -> int:
    try:
        return exec_checked(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
