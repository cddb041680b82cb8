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
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import REPO_ROOT
from lora_pipeline.defs.failures import USER_ERROR


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
    """The instance of $DAGSTER_HOME; in the cluster profile its Postgres database must answer (one line if not)."""
    from lora_pipeline.postgres import require_instance_database

    ensure_dagster_home()
    require_instance_database()
    return dg.DagsterInstance.get()


@functools.cache
def definitions() -> dg.Definitions:
    from lora_pipeline.definitions import defs

    return defs()


@dataclass(frozen=True)
class StepFailure:
    """A failed step of a run."""

    step: str
    message: str  # the failure's description, or the first line of the innermost error
    metadata: dict[str, Any]  # a `dg.Failure`'s metadata as plain values; empty when the step crashed
    reported: bool  # the step raised `dg.Failure` itself (a result it reports), rather than crashing
    error_class: str = ""  # a crash's innermost exception class, e.g. "OSError"; "" for a reported failure

    @property
    def user_error(self) -> bool:
        return bool(self.metadata.get(USER_ERROR))


def _plain(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {k: getattr(v, "value", v) for k, v in metadata.items()}


def step_failures(events: list[dg.DagsterEvent]) -> list[StepFailure]:
    failures = []
    for event in events:
        if not event.is_step_failure:
            continue
        data = event.step_failure_data
        reported = data.user_failure_data
        if reported is not None:
            failures.append(StepFailure(str(event.step_key), reported.description or "", _plain(reported.metadata),
                                        True))
            continue
        error = data.error
        while error is not None and error.cause is not None:
            error = error.cause
        message = error.message.strip().splitlines()[0] if error and error.message.strip() else "failed"
        failures.append(StepFailure(str(event.step_key), message, {}, False, error.cls_name if error else ""))
    return failures


def _blocked_steps(events: list[dg.DagsterEvent]) -> set[str]:
    """Steps that failed because a blocking asset check they evaluated did not pass."""
    blocked = set()
    for event in events:
        if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            evaluation = event.asset_check_evaluation_data
            if evaluation.blocking and not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR:
                blocked.add(str(event.step_key))
    return blocked


@dataclass
class RunOutcome:
    run_id: str
    success: bool
    events: list[dg.DagsterEvent]  # the run's Dagster events, in order
    failures: list[StepFailure] = field(default_factory=list)  # blocked steps and expected reported failures

    def metadata(self, asset: str) -> dict:
        """The metadata of the asset's materialization in this run, as plain values."""
        for event in self.events:
            if event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
                mat = event.step_materialization_data.materialization
                if mat.asset_key == dg.AssetKey(asset):
                    return _plain(mat.metadata)
        return {}

    def output_metadata(self, step: str) -> dict:
        """The metadata of a step's output in this run, as plain values."""
        for event in self.events:
            if event.is_successful_output and event.step_key == step:
                return _plain(event.step_output_data.metadata)
        return {}

    def failure(self, step: str) -> StepFailure | None:
        return next((f for f in self.failures if f.step == step), None)

    def check_passed(self, check_name: str) -> bool | None:
        for event in self.events:
            if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
                evaluation = event.asset_check_evaluation_data
                if evaluation.check_name == check_name:
                    return evaluation.passed
        return None


def _os_error_class(name: str) -> type[OSError] | None:
    """The built-in OSError class a failed step raised (disk full, read-only folder...), or None."""
    cls = getattr(builtins, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, OSError) else None


def run_job(
    job_name: str,
    partition_key: str | dg.MultiPartitionKey | None,
    inst: dg.DagsterInstance,
    quiet: bool = False,
    op_config: Mapping[str, Any] | None = None,
    reports_by_failing: Collection[str] = (),
    tags: Mapping[str, str] | None = None,
) -> RunOutcome:
    """Execute a job (for one partition, if it is partitioned) in this process, recorded in the instance; in the
    cluster profile (`submits_runs`), submit it to the instance's run queue and wait for it instead.

    The assets' progress lines go to stdout (the `console` logger in defs/loggers.py) unless quiet;
    `op_config` is the run config's `ops` section, `tags` extra run tags.

    A step that failed on a user error re-raises it as UserError (its one line), one that failed on an
    operating-system error (disk full, permission) as that OSError, an interrupted one as KeyboardInterrupt
    (the step's own clean-up has run by then: staging folders are removed). A run whose failures are all
    blocking asset checks, or `dg.Failure`s of the steps in `reports_by_failing` (a step whose failure is its
    result, as the verify op's findings), returns normally: the caller reads the check or
    `RunOutcome.failure`. Any other failure raises RuntimeError naming the run, so it can be read in the UI.

    First, runs whose process was killed are marked failed so their pool slots do not block this one
    (a line on stderr says so); this run is tagged with this process's pid for the same check later.
    """
    from lora_pipeline.defs.run_health import fail_dead_runs, process_tags

    fail_dead_runs(inst, lambda line: print(f"note: {line}", file=sys.stderr, flush=True))
    run_config: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "ERROR" if quiet else "INFO"}}}}
    if op_config:
        run_config["ops"] = dict(op_config)
    if submits_runs(inst):
        from lora_pipeline.submitted_runs import submit_and_wait

        run_id, success, events = submit_and_wait(inst, job_name, partition_key, run_config, tags)
    else:
        result = definitions().resolve_job_def(job_name).execute_in_process(
            run_config=run_config, instance=inst, partition_key=partition_key, raise_on_error=False,
            tags={**process_tags(), **(tags or {})},
        )
        run_id, success, events = result.run_id, result.success, result.all_events
    failures = step_failures(events)
    for failure in failures:
        if failure.user_error:
            raise UserError(failure.message)
        if failure.error_class == "DagsterExecutionInterruptedError":  # Ctrl-C (or SIGTERM, see cli.main)
            raise KeyboardInterrupt
        if os_error := _os_error_class(failure.error_class):
            raise os_error(failure.message.removeprefix(f"{failure.error_class}: "))
    blocked = _blocked_steps(events)
    for failure in failures:
        if failure.step not in blocked and not (failure.reported and failure.step in reports_by_failing):
            raise RuntimeError(f"run {run_id} of {job_name} failed in {failure.step}: {failure.message}")
    if not success and not failures:
        reason = run_failure_reason(events)
        raise RuntimeError(f"run {run_id} of {job_name} failed{f': {reason}' if reason else ''}")
    return RunOutcome(run_id, success, events, failures)


def run_failure_reason(events: list[dg.DagsterEvent]) -> str:
    """The last error the run itself (not a step) reported, on one line: e.g. a Celery worker lost while it ran a
    step ("... [dataset_snapshot]: ...WorkerLostError: Worker exited prematurely: signal 9 (SIGKILL) ...")."""
    found = ""
    for event in events:
        error = None
        if event.event_type == dg.DagsterEventType.RUN_FAILURE:
            error = event.job_failure_data.error
        elif event.event_type == dg.DagsterEventType.ENGINE_EVENT and event.engine_event_data is not None:
            error = event.engine_event_data.error
        if error is not None and error.message.strip():
            found = " ".join(line.strip() for line in error.message.strip().splitlines() if line.strip())
    return found


def submits_runs(inst: dg.DagsterInstance) -> bool:
    """Whether runs go through the instance's run queue (the cluster profile's QueuedRunCoordinator and an
    executor other than the default): then they are submitted and waited for, instead of run in this process."""
    from dagster._core.run_coordinator import QueuedRunCoordinator

    return isinstance(inst.run_coordinator, QueuedRunCoordinator) and os.environ.get(
        "LORA_PIPELINE_EXECUTOR", "default") != "default"
