"""Staging folders: a process killed with SIGKILL leaves one behind, and the next intake or build removes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lora_pipeline.core.datasets.staging import remove_abandoned, staging_folder
from lora_pipeline_tests.helpers import cli

# Enter a staging folder, write into it, say where it is, then wait (for a signal) or die at once.
HOLDER = """
import os, signal, sys
from pathlib import Path

import pytest
from lora_pipeline.core.datasets.staging import staging_folder
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
    from lora_pipeline.core.datasets import staging

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
