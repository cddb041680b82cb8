"""Runs submitted to the instance's run queue, for the cluster profile (deploy/cluster/): the daemon starts
each run's worker, whose Celery executor sends the steps to the `cpu` and `gpu` queues.

The job is read from the code location loaded in this process under the workspace's location name, so the
daemon and the webserver find the run's code where they load it themselves (workspace.yaml).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Mapping
from typing import Any

import dagster as dg
from dagster._cli.job import _create_run
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

from lora_pipeline.core.paths import REPO_ROOT
from lora_pipeline.defs.run_health import HOST_TAG

LOCATION = "lora_pipeline"  # workspace.yaml's location_name
POLL_S = 0.5
# Not a process of this host: the daemon's run monitoring watches the run worker it started.
QUEUED_HOST = "run-queue"


@functools.cache
def _code_location(inst: dg.DagsterInstance) -> Any:
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(executable_path=sys.executable, module_name="lora_pipeline.definitions",
                             working_directory=str(REPO_ROOT)),
        location_name=LOCATION,
    )
    return origin.create_location(inst)


def partition_tags(partition_key: str | dg.MultiPartitionKey | None) -> dict[str, str]:
    """The run tags that select a partition (and each dimension of a multi-partition key)."""
    if partition_key is None:
        return {}
    tags = {"dagster/partition": str(partition_key)}
    if isinstance(partition_key, dg.MultiPartitionKey):
        tags |= {f"dagster/partition/{dim}": key for dim, key in partition_key.keys_by_dimension.items()}
    return tags


def submit(inst: dg.DagsterInstance, job_name: str, partition_key: str | dg.MultiPartitionKey | None,
           run_config: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str:
    """Create a run of `job_name` for the partition and put it in the run queue; return its id."""
    location = _code_location(inst)
    repo = next(iter(location.get_repositories().values()))
    remote_job = repo.get_full_job(job_name)
    run = _create_run(instance=inst, code_location=location, remote_repo=repo, remote_job=remote_job,
                      run_config=dict(run_config),
                      tags={**partition_tags(partition_key), HOST_TAG: QUEUED_HOST, **(tags or {})},
                      op_selection=None, run_id=None)
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


def submit_and_wait(inst: dg.DagsterInstance, job_name: str, partition_key: str | dg.MultiPartitionKey | None,
                    run_config: Mapping[str, Any], tags: Mapping[str, str] | None = None,
                    ) -> tuple[str, bool, list[dg.DagsterEvent]]:
    """(run id, success, events) of a submitted run, once it has finished."""
    run_id = submit(inst, job_name, partition_key, run_config, tags)
    run = wait(inst, run_id)
    return run_id, run.status == dg.DagsterRunStatus.SUCCESS, run_events(inst, run_id)


def stop_automation(inst: dg.DagsterInstance) -> list[str]:
    """Stop every sensor and schedule of the code location in the instance (they start RUNNING by default);
    return their names. `make cluster-demo` and the tests run the chain themselves, so they stop them before the
    daemon starts: the spec sensor would otherwise build every spec at once, racing the chain's own builds."""
    repo = next(iter(_code_location(inst).get_repositories().values()))
    stopped = []
    for sensor in repo.get_sensors():
        inst.stop_sensor(sensor.get_remote_origin_id(), sensor.selector_id, sensor)
        stopped.append(sensor.name)
    for schedule in repo.get_schedules():
        inst.stop_schedule(schedule.get_remote_origin_id(), schedule.selector_id, schedule)
        stopped.append(schedule.name)
    return stopped
