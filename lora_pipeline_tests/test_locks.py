"""`exclusive_lock` between real processes: refused naming the holder's pid, released when the holder is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.locks import exclusive_lock, refuse_if_locked

HOLDER = """
import sys, time
from pathlib import Path
from lora_pipeline.core.locks import exclusive_lock, refuse_if_locked
with exclusive_lock(Path(sys.argv[1]), busy="busy"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_held_lock_is_refused_with_the_holders_pid_and_freed_by_sigkill(tmp_path):
    lock = tmp_path / "out" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError) as refused, exclusive_lock(lock, busy="already being trained"):
            pass
        assert str(refused.value) == f"{lock.parent}: already being trained by pid {holder.pid} (lock .lock)"
        with pytest.raises(UserError) as probed:  # the probe gives the same refusal and leaves the pid as it was
            refuse_if_locked(lock, "already being trained")
        assert str(probed.value) == str(refused.value) and lock.read_text() == f"{holder.pid}\n"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    started = time.monotonic()
    with exclusive_lock(lock, busy="already being trained"):  # the kernel dropped the dead holder's lock
        assert lock.read_text() == f"{os.getpid()}\n"
    assert time.monotonic() - started < 1.0
    refuse_if_locked(lock, "already being trained")  # free now: no refusal
    refuse_if_locked(tmp_path / "never" / ".lock", "already being trained")  # never locked: nothing created
    assert not (tmp_path / "never").exists()


def test_without_busy_a_second_holder_waits_for_the_first(tmp_path):
    lock = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    subprocess.Popen(["sh", "-c", f"sleep 1; kill -9 {holder.pid}"])
    started = time.monotonic()
    with exclusive_lock(lock):
        waited = time.monotonic() - started
    holder.wait()
    assert 0.5 < waited < 30 and holder.returncode == -signal.SIGKILL
