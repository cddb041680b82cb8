"""Running the code location's jobs through the persistent Dagster instance (what the CLI uses).

Runs launched here are recorded in $DAGSTER_HOME, so `make ui` shows them next to the ones the
sensors and the UI start.
"""

from __future__ import annotations

import builtins
import functools
import os
import shutil
import sys
from dataclasses import dataclass

import dagster as dg

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import REPO_ROOT


def ensure_dagster_home() -> str:
    """$DAGSTER_HOME, defaulting to the repo's git-ignored `.dagster_home` with our dagster.yaml."""
    home = os.environ.get("DAGSTER_HOME") or str(REPO_ROOT / ".dagster_home")
    os.environ["DAGSTER_HOME"] = home
    os.makedirs(home, exist_ok=True)
    config = os.path.join(home, "dagster.yaml")
    if not os.path.exists(config) and (REPO_ROOT / "dagster.yaml").is_file():
        shutil.copyfile(REPO_ROOT / "dagster.yaml", config)
    return home


def instance() -> dg.DagsterInstance:
    ensure_dagster_home()
    return dg.DagsterInstance.get()


@functools.cache
def definitions() -> dg.Definitions:
    from lora_pipeline.definitions import defs

    return defs()


@dataclass
class RunOutcome:
    run_id: str
    success: bool
    result: dg.ExecuteInProcessResult

    def metadata(self, asset: str) -> dict:
        """The metadata of the asset's materialization in this run, as plain values."""
        for event in self.result.get_asset_materialization_events():
            mat = event.step_materialization_data.materialization
            if mat.asset_key == dg.AssetKey(asset):
                return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
        return {}

    def check_passed(self, check_name: str) -> bool | None:
        for evaluation in self.result.get_asset_check_evaluations():
            if evaluation.check_name == check_name:
                return evaluation.passed
        return None


def _os_error_class(name: str) -> type[OSError] | None:
    """The built-in OSError class a failed step raised (disk full, read-only folder...), or None."""
    cls = getattr(builtins, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, OSError) else None


def run_job(
    job_name: str, partition_key: str | dg.MultiPartitionKey, inst: dg.DagsterInstance, quiet: bool = False
) -> RunOutcome:
    """Execute a job for one partition in this process, recorded in the instance.

    The assets' progress lines go to stdout (the `console` logger in defs/loggers.py) unless quiet.

    A step that failed on a user error re-raises it as UserError (its one line), one that failed on an
    operating-system error (disk full, permission) as that OSError, an interrupted one as KeyboardInterrupt
    (the step's own clean-up has run by then: staging folders are removed); a run whose only
    failure is a blocking asset check returns normally (the caller reads the check); any other
    failure raises RuntimeError naming the run so it can be read in the UI.

    First, runs whose process was killed are marked failed so their pool slots do not block this one
    (a line on stderr says so); this run is tagged with this process's pid for the same check later.
    """
    from lora_pipeline.defs.run_health import fail_dead_runs, process_tags

    fail_dead_runs(inst, lambda line: print(f"note: {line}", file=sys.stderr, flush=True))
    job = definitions().resolve_job_def(job_name)
    run_config = {"loggers": {"console": {"config": {"log_level": "ERROR" if quiet else "INFO"}}}}
    result = job.execute_in_process(
        run_config=run_config, instance=inst, partition_key=partition_key, raise_on_error=False,
        tags=process_tags(),
    )
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure:
                error = event.step_failure_data.error
                while error.cause is not None:
                    error = error.cause
                message = error.message.strip().splitlines()[0] if error.message else error.cls_name
                if error.cls_name == "UserError":
                    raise UserError(message.removeprefix("lora_pipeline.core.errors.UserError: "))
                if error.cls_name == "DagsterExecutionInterruptedError":  # Ctrl-C (or SIGTERM, see cli.main)
                    raise KeyboardInterrupt
                if os_error := _os_error_class(error.cls_name):
                    raise os_error(message.removeprefix(f"{error.cls_name}: "))
                if error.cls_name == "DagsterAssetCheckFailedError":
                    continue
                raise RuntimeError(f"run {result.run_id} of {job_name} failed: {message}")
        if not result.get_asset_check_evaluations():
            raise RuntimeError(f"run {result.run_id} of {job_name} failed")
    return RunOutcome(result.run_id, result.success, result)
