"""Runs submitted to the instance's run queue, for the cluster profile (deploy/cluster/): the daemon starts
each run's worker, whose Celery executor sends the steps to the `cpu` and `gpu` queues.

The run is created through the public `DagsterInstance.create_run_for_job`, with the origins of its job in the
code location as workspace.yaml names it (runs/dagster_internals.py), so the daemon and the webserver find the
run's code where they load it themselves.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import dagster as dg

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.settings import settings
from lora_pipeline.defs.run_health import HOST_TAG
from lora_pipeline.runs.dagster_internals import located_job

POLL_S = 0.5
QUEUED_CHECK_S = 5.0  # how often a queued run's waiter checks that a daemon still consumes the queue
# The daemon's run queue beats every 30 s: none for longer than this means no daemon consumes the queue.
HEARTBEAT_TOLERANCE_S = 120.0
QUEUE_DAEMON = "QUEUED_RUN_COORDINATOR"
START_DAEMON = ("start the cluster's daemon: `python -m lora_pipeline.runs.exec -- dagster-daemon run -w "
                "workspace.yaml` with deploy/cluster/env.sh sourced, or `make cluster-demo` on one machine")
# Not a process of this host: the daemon's run monitoring watches the run worker it started.
QUEUED_HOST = "run-queue"


def submits_runs(inst: dg.DagsterInstance) -> bool:
    """Whether runs go through the instance's run queue (the cluster profile's QueuedRunCoordinator and an
    executor other than the default): then they are submitted and waited for, instead of run in this process."""
    return isinstance(inst.run_coordinator, dg.QueuedRunCoordinator) and settings().executor != "default"


def partition_tags(partition_key: str | None) -> dict[str, str]:
    """The run tags that select a partition."""
    return {} if partition_key is None else {"dagster/partition": partition_key}


@contextmanager
def _interrupts_held() -> Iterator[list[int]]:
    """Hold Ctrl-C and SIGTERM until the block has ended, then raise KeyboardInterrupt; the block may poll the
    list of signals heard so far. Two uses:

    - `submit`: Dagster's `submit_run` reports any exception inside it as the run's failure, so an interrupt there
      would leave a FAILURE where the user asked for a cancel; held, it cancels the queued run instead;
    - `submit_and_wait`'s wait, which polls the list: a KeyboardInterrupt raised wherever the signal lands can be
      dropped by the interpreter (raised inside a finalizer it is only printed, "Exception ignored in ..."), and
      the waiter then waited on until the daemon's heartbeat went stale (HEARTBEAT_TOLERANCE_S)."""
    heard: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield heard
        return
    previous = {sig: signal.signal(sig, lambda number, _frame: heard.append(number))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield heard
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if heard:
        raise KeyboardInterrupt


def submit(inst: dg.DagsterInstance, job_name: str, partition_key: str | None,
           run_config: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str:
    """Create a run of `job_name` for the partition and put it in the run queue; return its id. The id is chosen
    here, and interrupts are held while the run is created and queued, so that a Ctrl-C at any moment after its
    row is written cancels it (Dagster itself would mark a run interrupted inside `submit_run` as failed)."""
    job = located_job(inst, job_name)
    run_id = str(uuid.uuid4())  # a run id as Dagster makes them
    try:
        with _interrupts_held():
            inst.create_run_for_job(
                job.definition, run_id=run_id, run_config=dict(run_config),
                tags={**partition_tags(partition_key), HOST_TAG: QUEUED_HOST, **(tags or {})},
                remote_job_origin=job.remote_origin, job_code_origin=job.python_origin,
            )
            inst.submit_run(run_id, None)  # type: ignore[arg-type]  # the QueuedRunCoordinator needs no workspace
    except BaseException:  # Ctrl-C while creating the run or before it is queued
        give_up(inst, run_id)
        raise
    return run_id


def _say_new_messages(inst: dg.DagsterInstance, run_id: str, cursor: str | None, say: Callable[[str], None]
                      ) -> str | None:
    """`say` each message the run's steps logged (INFO and above) since `cursor`; the new cursor."""
    connection = inst.get_records_for_run(run_id, cursor=cursor)
    for record in connection.records:
        entry = record.event_log_entry
        if entry.dagster_event is None and entry.level >= logging.INFO and entry.user_message:
            say(entry.user_message)
    return connection.cursor or cursor


def wait(inst: dg.DagsterInstance, run_id: str, timeout_s: float | None = None,
         while_queued: Callable[[], str | None] | None = None, say: Callable[[str], None] | None = None,
         interrupted: Callable[[], bool] | None = None) -> dg.DagsterRun:
    """The run once it has finished (success, failure or canceled). `while_queued`, asked every few seconds while
    the run is still queued, may give a reason to stop waiting: a UserError then. `say` hears the steps' progress
    lines as the workers log them (the epoch lines of a training), as a run in this process prints them.
    `interrupted`, asked at every poll, stops the wait with KeyboardInterrupt (a Ctrl-C held by the caller)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    next_check = time.monotonic()
    cursor: str | None = None
    while True:
        if interrupted is not None and interrupted():
            raise KeyboardInterrupt
        run = inst.get_run_by_id(run_id)
        if run is None:
            raise RuntimeError(f"run {run_id} is not in the instance")
        if say is not None:
            cursor = _say_new_messages(inst, run_id, cursor, say)
        if run.is_finished:
            if say is not None:
                _say_new_messages(inst, run_id, cursor, say)
            return run
        if while_queued is not None and run.status == dg.DagsterRunStatus.QUEUED and time.monotonic() >= next_check:
            next_check = time.monotonic() + QUEUED_CHECK_S
            if problem := while_queued():
                raise UserError(f"run {run_id} of {run.job_name} is still queued: {problem}")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} of {run.job_name} still {run.status.value} after {timeout_s:.0f} s")
        time.sleep(POLL_S)


def run_events(inst: dg.DagsterInstance, run_id: str) -> list[dg.DagsterEvent]:
    return [entry.dagster_event for entry in inst.all_logs(run_id) if entry.dagster_event is not None]


def queue_consumer_problem(inst: dg.DagsterInstance) -> str | None:
    """One line when no daemon consumes the instance's run queue (its heartbeat is missing or stale); else None."""
    beat = inst.get_daemon_heartbeats().get(QUEUE_DAEMON)
    if beat is None:
        return f"nothing consumes the instance's run queue: no dagster-daemon has ever run on it ({START_DAEMON})"
    silent = time.time() - beat.timestamp
    if silent > HEARTBEAT_TOLERANCE_S:
        return (f"nothing consumes the instance's run queue: its dagster-daemon has not beaten for {silent:.0f} s "
                f"({START_DAEMON})")
    return None


def give_up(inst: dg.DagsterInstance, run_id: str) -> None:
    """Cancel a run this process stops waiting for, so that no run it gave up on stays queued (or running)."""
    run = inst.get_run_by_id(run_id)
    if run is None or run.is_finished:
        return
    if run.status in (dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.QUEUED):
        inst.report_run_canceled(run, message="canceled by the command that submitted it, which stopped waiting")
    else:
        inst.run_coordinator.cancel_run(run_id)


def submit_and_wait(inst: dg.DagsterInstance, job_name: str, partition_key: str | None,
                    run_config: Mapping[str, Any], tags: Mapping[str, str] | None = None,
                    say: Callable[[str], None] | None = None) -> tuple[str, bool, list[dg.DagsterEvent]]:
    """(run id, success, events) of a submitted run, once it has finished. Refused in one line, before a run is
    made, when no daemon consumes the queue; a run this call stops waiting for (Ctrl-C, the daemon gone while
    the run is still queued) is canceled. `say` hears the steps' progress lines (see `wait`)."""
    if problem := queue_consumer_problem(inst):
        raise UserError(problem)
    run_id = submit(inst, job_name, partition_key, run_config, tags)
    try:
        with _interrupts_held() as heard:  # polled by the wait: no Ctrl-C is lost (see _interrupts_held)
            run = wait(inst, run_id, while_queued=lambda: queue_consumer_problem(inst), say=say,
                       interrupted=lambda: bool(heard))
    except BaseException:
        give_up(inst, run_id)
        raise
    return run_id, run.status == dg.DagsterRunStatus.SUCCESS, run_events(inst, run_id)
