"""The one module that uses Dagster's internal classes (`dagster._core`): what the public API leaves out.

A run submitted to the daemon's queue must carry the origin of its job, the code location and repository the
daemon loads from workspace.yaml, so that the daemon (and the webserver) find its code; a run worker needs the
job's Python origin. Dagster computes both only for a code location it has loaded, so the code location is
loaded here, in this process, under the workspace's location name. Sensors and schedules are stopped through
the same loaded code location. The run itself is created and submitted through the public `DagsterInstance`
methods (runs/queue.py).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dagster as dg
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.remote_representation.code_location import CodeLocation
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

from lora_pipeline.core.paths import REPO_ROOT

LOCATION = "lora_pipeline"  # workspace.yaml's location_name
DEFINITIONS_MODULE = "lora_pipeline.definitions"  # workspace.yaml's module_name


@contextlib.contextmanager
def _code_location(inst: dg.DagsterInstance) -> Iterator[CodeLocation]:
    """The code location as workspace.yaml declares it, loaded in this process now (so with the executor the
    settings name now)."""
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(executable_path=sys.executable, module_name=DEFINITIONS_MODULE,
                             working_directory=str(REPO_ROOT)),
        location_name=LOCATION,
    )
    with origin.create_location(inst) as location:
        yield location


@dataclass(frozen=True)
class LocatedJob:
    """A job of the code location with the origins a queued run records."""

    definition: dg.JobDefinition
    remote_origin: Any  # the code location and repository where the daemon and the webserver find the job
    python_origin: Any  # how a run worker loads the job's code


def located_job(inst: dg.DagsterInstance, job_name: str) -> LocatedJob:
    with _code_location(inst) as location:
        (repository,) = location.get_repositories().values()
        job = location.get_reconstructable_job(repository.name, job_name)
        return LocatedJob(job.get_definition(), repository.get_full_job(job_name).get_remote_origin(),
                          job.get_python_origin())


def stop_automation(inst: dg.DagsterInstance) -> list[str]:
    """Stop every sensor and schedule of the code location in the instance (they start RUNNING by default);
    return their names. `make cluster-demo` and the tests run the chain themselves, so they stop them before the
    daemon starts: the spec sensor would otherwise build every spec at once, racing the chain's own builds."""
    with _code_location(inst) as location:
        (repository,) = location.get_repositories().values()
        stopped = []
        for sensor in repository.get_sensors():
            inst.stop_sensor(sensor.get_remote_origin_id(), sensor.selector_id, sensor)
            stopped.append(sensor.name)
        for schedule in repository.get_schedules():
            inst.stop_schedule(schedule.get_remote_origin_id(), schedule.selector_id, schedule)
            stopped.append(schedule.name)
    return stopped
