"""Running the code location's jobs through the persistent Dagster instance (what the CLI uses): in this process,
or, in the cluster profile, through the instance's run queue (runs/queue.py)."""

from __future__ import annotations

import builtins
import sys
from collections.abc import Collection, Mapping
from typing import Any

import dagster as dg

from lora_pipeline.core.errors import UserError
from lora_pipeline.defs.run_health import fail_dead_runs, process_tags
from lora_pipeline.runs.instance import definitions
from lora_pipeline.runs.outcome import RunOutcome, blocked_steps, run_failure_reason, step_failures
from lora_pipeline.runs.queue import submit_and_wait, submits_runs


def _os_error_class(name: str) -> type[OSError] | None:
    """The built-in OSError class a failed step raised (disk full, read-only folder...), or None."""
    cls = getattr(builtins, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, OSError) else None


def run_job(
    job_name: str,
    partition_key: str | None,
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
    fail_dead_runs(inst, lambda line: print(f"note: {line}", file=sys.stderr, flush=True))
    run_config: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "ERROR" if quiet else "INFO"}}}}
    if op_config:
        run_config["ops"] = dict(op_config)
    if submits_runs(inst):
        run_id, success, events = submit_and_wait(inst, job_name, partition_key, run_config, tags,
                                                  say=None if quiet else lambda line: print(line, flush=True))
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
    blocked = blocked_steps(events)
    for failure in failures:
        if failure.step not in blocked and not (failure.reported and failure.step in reports_by_failing):
            raise RuntimeError(f"run {run_id} of {job_name} failed in {failure.step}: {failure.message}")
    if not success and not failures:
        reason = run_failure_reason(events)
        raise RuntimeError(f"run {run_id} of {job_name} failed{f': {reason}' if reason else ''}")
    return RunOutcome(run_id, success, events, failures)
