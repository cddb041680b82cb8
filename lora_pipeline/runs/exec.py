"""`python -m lora_pipeline.runs.exec [--postgres URL] -- COMMAND...`: what every process of the cluster profile
runs (README, "Running on several machines"; deploy/cluster/): one line and exit 1 when the database (default
the instance's, $LORA_PIPELINE_DAGSTER_PG_URL) does not answer, else become COMMAND (the daemon, the webserver,
a Celery worker, the MLflow server)."""

from __future__ import annotations

import os
import sys

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.settings import settings
from lora_pipeline.runs.postgres import require_postgres

USAGE = "usage: python -m lora_pipeline.runs.exec [--postgres URL] -- COMMAND..."


def checked(argv: list[str], database: str | None = None) -> list[str]:
    """`argv` behind the Postgres check of this module: the database (default the instance's) must answer."""
    check = ["--postgres", database] if database else []
    return [sys.executable, "-m", "lora_pipeline.runs.exec", *check, "--", *argv]


def exec_checked(args: list[str]) -> int:
    """Check the database of `[--postgres URL] -- COMMAND...`, then replace this process with COMMAND."""
    database = args[args.index("--postgres") + 1] if "--postgres" in args else settings().dagster_pg_url
    command = args[args.index("--") + 1:]
    if database:
        require_postgres(database)
    os.execvp(command[0], command)
    return 1  # not reached


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--" not in args or not args[args.index("--") + 1:]:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        return exec_checked(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
