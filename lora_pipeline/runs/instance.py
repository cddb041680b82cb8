"""The persistent Dagster instance (what the CLI records its runs in) and the code location loaded in this process.

Runs launched through this instance are recorded in $DAGSTER_HOME, so `make ui` shows them next to the ones
the sensors and the UI start.
"""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path

import dagster as dg

from lora_pipeline.core.fileio import atomic_write_bytes
from lora_pipeline.core.locks import exclusive_lock
from lora_pipeline.core.paths import REPO_ROOT
from lora_pipeline.runs.dagster_internals import DEFINITIONS_MODULE

INSTANCE_LOCK = ".instance.lock"  # in $DAGSTER_HOME


def ensure_dagster_home() -> str:
    """$DAGSTER_HOME, defaulting to the repo's git-ignored `.dagster_home` with our dagster.yaml."""
    home = os.environ.get("DAGSTER_HOME") or str(REPO_ROOT / ".dagster_home")
    os.environ["DAGSTER_HOME"] = home
    os.makedirs(home, exist_ok=True)
    config = os.path.join(home, "dagster.yaml")
    if not os.path.exists(config) and (REPO_ROOT / "dagster.yaml").is_file():
        atomic_write_bytes(Path(config), (REPO_ROOT / "dagster.yaml").read_bytes())  # never read half-written
    return home


def instance() -> dg.DagsterInstance:
    """The instance of $DAGSTER_HOME; in the cluster profile its Postgres database must answer (one line if not)."""
    from lora_pipeline.runs.postgres import require_instance_database

    home = ensure_dagster_home()
    require_instance_database()
    # Opening the instance creates its storage on first use (tables, alembic stamp, indexes), which two processes
    # starting at once on a fresh home would both try: one process at a time (the kernel drops a dead holder's).
    with exclusive_lock(Path(home) / INSTANCE_LOCK):
        return dg.DagsterInstance.get()


@functools.cache
def definitions() -> dg.Definitions:
    """The code location's definitions, loaded once in this process by its module name, as workspace.yaml names it
    to the webserver and the daemon: the run machinery runs the code location and sits below it (the package's
    top level, where `cli.py` and `definitions.py` are, imports runs/, never the reverse)."""
    return importlib.import_module(DEFINITIONS_MODULE).defs()
