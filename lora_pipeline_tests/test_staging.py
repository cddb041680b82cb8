"""Staging folders: a process killed with SIGKILL leaves one behind, and the next intake or build removes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lora_pipeline.core.datasets.sources.staging import map_in_threads, remove_abandoned, staging_folder
from lora_pipeline_tests.helpers import cli

# Enter a staging folder, write into it, say where it is, then wait (for a signal) or die at once.
HOLDER = """
import os, signal, sys
from pathlib import Path

import pytest
from lora_pipeline.core.datasets.sources.staging import staging_folder
with staging_folder(Path(sys.argv[1]), sys.argv[2]) as staging:
    (staging / "half.png").write_bytes(b"x" * 1000)
    print(staging, flush=True)
    if sys.argv[3] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()
"""


def _hold(parent: Path, name: str, how: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(parent), name, how], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def test_only_the_staging_folders_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead, dead_staging = _hold(tmp_path, "b1", "kill")
    assert dead.wait(10) == -signal.SIGKILL and dead_staging.is_dir()
    alive, alive_staging = _hold(tmp_path, "b2", "wait")
    old_style = tmp_path / ".b3.tmp-4242"  # the pid-only name of the previous release: never locked
    old_style.mkdir()
    (tmp_path / "b4").mkdir()  # a finished folder is never touched

    removed = remove_abandoned(tmp_path)

    assert sorted(removed) == sorted([dead_staging.name, old_style.name])
    assert alive_staging.is_dir() and (tmp_path / "b4").is_dir()
    alive.stdin.close()
    assert alive.wait(10) == 0
    assert remove_abandoned(tmp_path) == [alive_staging.name]  # its process is gone: the lock went with it


def test_a_failed_body_removes_its_staging_folder(tmp_path: Path) -> None:
    try:
        with staging_folder(tmp_path, "b1") as staging:
            (staging / "a.png").write_bytes(b"x")
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_right_after_the_folder_appears_removes_it(tmp_path: Path, monkeypatch) -> None:
    """The CLI's interrupt test signals as soon as the staging folder appears, so the KeyboardInterrupt can land
    before the body starts: here, while the new folder's lock is taken."""
    from lora_pipeline.core.datasets.sources import staging

    real = staging._open_dir

    def interrupted(path: Path) -> int:
        if path != tmp_path:  # the parent's lock is taken; the new folder's is not
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(staging, "_open_dir", interrupted)
    with pytest.raises(KeyboardInterrupt), staging_folder(tmp_path, "b1"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_the_next_intake_removes_what_a_killed_intake_left(sample_root, tmp_path: Path) -> None:
    dead, staging = _hold(sample_root.sources, "big-batch", "kill")
    dead.wait(10)
    assert staging.is_dir()
    handoff = tmp_path / "handoff"
    handoff.mkdir()
    (handoff / "a.txt").write_text("hdaesth, front view\n")
    out = json.loads(cli("intake", str(handoff), "--batch", "next-batch", "--json").stdout)
    assert out["files"] == 1 and not staging.exists()
    assert not [p for p in os.listdir(sample_root.sources) if p.startswith(".")]


def _recording_job(events: list[str], fail_at: int | None = None):
    def job(i: int) -> int:
        events.append(f"start {i}")
        if i == fail_at:
            raise OSError(28, "No space left on device")
        time.sleep(0.05)
        events.append(f"end {i}")
        return i
    return job


def test_map_in_threads_returns_only_once_no_job_runs_and_starts_none_after_a_failure():
    assert map_in_threads(lambda i: i * i, range(7), 2) == [0, 1, 4, 9, 16, 25, 36]
    events: list[str] = []
    with pytest.raises(OSError):
        map_in_threads(_recording_job(events, fail_at=2), range(40), 2)
    at_return = list(events)
    started = {e.split()[1] for e in at_return if e.startswith("start")} - {"2"}
    assert started == {e.split()[1] for e in at_return if e.startswith("end")}  # every other job had ended
    time.sleep(0.3)
    assert events == at_return and len(started) < 39  # and none started afterwards


def test_an_interrupt_while_the_pool_starts_a_thread_still_waits_for_that_threads_job(monkeypatch):
    # The interrupt lands in Thread.start after the worker began: the pool never registers that thread, so
    # ThreadPoolExecutor.shutdown(wait=True) does not join it, and it would copy on into a removed staging folder.
    real_start, starts = threading.Thread.start, []

    def start_then_interrupt(thread: threading.Thread) -> None:
        real_start(thread)
        starts.append(thread)
        if len(starts) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", start_then_interrupt)
    events: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        map_in_threads(_recording_job(events), range(8), 2)
    at_return = list(events)
    assert len(starts) == 2
    assert sum(e.startswith("start") for e in at_return) == sum(e.startswith("end") for e in at_return)
    time.sleep(0.3)
    assert events == at_return  # it took no further job
