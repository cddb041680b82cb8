"""Runs whose process is gone: marked failed and their pool slots freed, so they cannot block the next run.

A run executed in a process that was killed (`kill -9`, a crash, a closed laptop lid) stays STARTED in the
instance and keeps the `gpu` pool slot its step claimed, so every later training waits for it forever.
Dagster's run monitoring (dagster.yaml) cannot see that for these runs: the CLI executes runs in its own
process, not through a run launcher whose worker the daemon could health-check. So the CLI (before it
starts a run), the training asset and `dead_run_sensor` (every 30 s while the daemon of `make ui` runs, so a
run from the UI is not left waiting for a dead run's slot) look for unfinished runs whose process is gone.

A run's process is the pid in its `lora_pipeline/pid` tag (runs the CLI starts), else the pid in its first
engine event that names one (the run worker of a run started from the UI or a sensor). A process that
exists but started after that pid was recorded is an unrelated one that reuses the number.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import dagster as dg
import psutil

PID_TAG = "lora_pipeline/pid"
HOST_TAG = "lora_pipeline/host"
UNFINISHED = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
CLOCK_SLACK_S = 1.0  # process start times are rounded to clock ticks


def process_tags() -> dict[str, str]:
    """Tags that name the process executing a run in this process (see the module docstring)."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def _recorded_pid(instance: dg.DagsterInstance, record: dg.RunRecord) -> tuple[int, float] | None:
    """(pid, a time the process certainly existed) of the run's process, or None if nothing names it."""
    run = record.dagster_run
    if run.tags.get(PID_TAG, "").isdigit():
        return int(run.tags[PID_TAG]), record.create_timestamp.timestamp()
    events = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT, limit=50).records
    for event in events:
        data = event.event_log_entry.dagster_event.engine_event_data
        pid = data.metadata.get("pid") if data else None
        if pid is not None and str(pid.value).isdigit():
            return int(pid.value), event.event_log_entry.timestamp
    return None


def process_alive(pid: int, existed_at: float) -> bool:
    try:
        process = psutil.Process(pid)
        return process.create_time() <= existed_at + CLOCK_SLACK_S and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # cannot look: it exists, so it is not proven gone
        return True


def fail_dead_runs(instance: dg.DagsterInstance, say: Callable[[str], None]) -> list[str]:
    """Mark every unfinished run of this host whose process is gone failed, free its concurrency slots and
    `say` one line about each; return their run ids."""
    failed = []
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=UNFINISHED)):
        run = record.dagster_run
        if run.tags.get(HOST_TAG, socket.gethostname()) != socket.gethostname():
            continue  # a process on another machine cannot be checked from here
        recorded = _recorded_pid(instance, record)
        if recorded is None or process_alive(*recorded):
            continue
        current = instance.get_run_by_id(run.run_id)
        if current is None or current.is_finished:  # another process got to it first
            continue
        partition = run.tags.get("dagster/partition", "")
        line = (f"run {run.run_id} of {run.job_name}{f' ({partition})' if partition else ''} was {run.status.value} "
                f"but its process {recorded[0]} is gone: marked it failed and freed its pool slots")
        instance.report_run_failed(run, line)
        if instance.event_log_storage.supports_global_concurrency_limits:
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        say(line)
        failed.append(run.run_id)
    return failed


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def dead_run_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    """Fail unfinished runs whose process is gone and free their pool slots (a warning in the log for each)."""
    failed = fail_dead_runs(context.instance, context.log.warning)
    return dg.SkipReason(f"failed {len(failed)} run(s) whose process is gone" if failed else "no dead runs")
