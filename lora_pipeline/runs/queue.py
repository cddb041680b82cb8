"""Runs submitted to the instance's run queue, for the cluster profile (deploy/cluster/): the daemon starts
each run's worker, whose Celery executor sends the steps to the `cpu` and `gpu` queues.

The run is created through the public `DagsterInstance.create_run_for_job`, with the origins of its job in the
code location as workspace.yaml names it (runs/dagster_internals.py), so the daemon and the webserver find the
run's code where they load it themselves.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import dagster as dg

from lora_pipeline.core.settings import settings
from lora_pipeline.defs.run_health import HOST_TAG
from lora_pipeline.runs.dagster_internals import located_job

POLL_S = 0.5
# Not a process of this host: the daemon's run monitoring watches the run worker it started.
QUEUED_HOST = "run-queue"


def submits_runs(inst: dg.DagsterInstance) -> bool:
    """Whether runs go through the instance's run queue (the cluster profile's QueuedRunCoordinator and an
    executor other than the default): then they are submitted and waited for, instead of run in this process."""
    return isinstance(inst.run_coordinator, dg.QueuedRunCoordinator) and settings().executor != "default"


def partition_tags(partition_key: str | None) -> dict[str, str]:
    """The run tags that select a partition."""
    return {} if partition_key is None else {"dagster/partition": partition_key}


def submit(inst: dg.DagsterInstance, job_name: str, partition_key: str | None,
           run_config: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str:
    """Create a run of `job_name` for the partition and put it in the run queue; return its id."""
    job = located_job(inst, job_name)
    run = inst.create_run_for_job(
        job.definition, run_config=dict(run_config),
        tags={**partition_tags(partition_key), HOST_TAG: QUEUED_HOST, **(tags or {})},
        remote_job_origin=job.remote_origin, job_code_origin=job.python_origin,
    )
    inst.submit_run(run.run_id, None)  # type: ignore[arg-type]  # the QueuedRunCoordinator needs no workspace
    return run.run_id


def wait(inst: dg.DagsterInstance, run_id: str, timeout_s: float | None = None) -> dg.DagsterRun:
    """The run once it has finished (success, failure or canceled)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        run = inst.get_run_by_id(run_id)
        if run is None:
            raise RuntimeError(f"run {run_id} is not in the instance")
        if run.is_finished:
            return run
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} of {run.job_name} still {run.status.value} after {timeout_s:.0f} s")
        time.sleep(POLL_S)


def run_events(inst: dg.DagsterInstance, run_id: str) -> list[dg.DagsterEvent]:
    return [entry.dagster_event for entry in inst.all_logs(run_id) if entry.dagster_event is not None]


def submit_and_wait(inst: dg.DagsterInstance, job_name: str, partition_key: str | None,
                    run_config: Mapping[str, Any], tags: Mapping[str, str] | None = None,
                    ) -> tuple[str, bool, list[dg.DagsterEvent]]:
    """(run id, success, events) of a submitted run, once it has finished."""
    run_id = submit(inst, job_name, partition_key, run_config, tags)
    run = wait(inst, run_id)
    return run_id, run.status == dg.DagsterRunStatus.SUCCESS, run_events(inst, run_id)
