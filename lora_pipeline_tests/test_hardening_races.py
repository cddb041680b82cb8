"""Processes racing on one Dagster instance (issue 27): the first commands on a fresh $DAGSTER_HOME (each would
create the storage's tables and stamp its schema), and builds registering the same new version at once (the
partition's unique constraint). Processes start together at a barrier, the way a person starts two commands."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

PROCESSES = 4
TRIES = 1  # each race is run this many times (before the fixes, most tries failed at least one process)
# Registrations race in rounds, each a new pair of keys behind a barrier: the window between the storage's look and
# its insert is short, and one round alone missed it in 5 of 5 tries on the code before the fix; 30 rounds hit it.
ROUNDS = 30


def _first_use(home: str, register: bool, barrier, results) -> None:
    os.environ["DAGSTER_HOME"] = home
    try:
        from lora_pipeline.defs import partitions
        from lora_pipeline.runs.instance import instance

        if register:
            inst = instance()
            added = []
            for round_ in range(ROUNDS):
                barrier.wait()
                added += partitions.register(inst, partitions.dataset_versions, _keys(round_))
            results.put(("ok", tuple(added)))
        else:
            barrier.wait()
            inst = instance()
            results.put(("ok", (len(inst.get_runs(limit=1)),)))
    except BaseException as exc:  # reported to the test, which shows it
        barrier.abort()  # the others stop at their next round (BrokenBarrierError) instead of waiting for this one
        results.put(("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))


def _keys(round_: int) -> list[str]:
    return [f"v-new-{round_}", f"v-other-{round_}"]


def _race(home: Path, register: bool) -> list[tuple[str, tuple]]:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(PROCESSES), context.Queue()
    processes = [context.Process(target=_first_use, args=(str(home), register, barrier, results))
                 for _ in range(PROCESSES)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=240) for _ in processes]
    for process in processes:
        process.join(60)
    return outcomes


@pytest.mark.parametrize("register", [False, True], ids=["fresh-home", "same-new-version"])
def test_processes_racing_on_one_instance(tmp_path, register):
    from lora_pipeline.defs import partitions
    from lora_pipeline.runs.instance import instance

    for attempt in range(TRIES):
        home = tmp_path / f"home-{attempt}"
        home.mkdir()
        if register:  # the instance exists; the version is new to it
            os.environ["DAGSTER_HOME"] = str(home)
            instance().get_runs(limit=1)
        outcomes = _race(home, register)
        assert [status for status, _ in outcomes] == ["ok"] * PROCESSES, outcomes
        if register:  # each key is registered once
            os.environ["DAGSTER_HOME"] = str(home)
            known = instance().get_dynamic_partitions(partitions.dataset_versions.name)
            assert sorted(known) == sorted(k for r in range(ROUNDS) for k in _keys(r)), known
