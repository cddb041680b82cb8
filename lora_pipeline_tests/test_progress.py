"""CPU threads on a shared machine and the in-epoch progress lines (core/training/progress.py)."""

from __future__ import annotations

import os

from lora_pipeline.core.training import progress as cpu


def test_threads_leave_the_cores_others_keep_busy_and_respect_the_users_choice(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for load, threads in ((0.2, 4), (1.7, 3), (3.0, 1), (11.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert cpu.training_threads() == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu.training_threads() is None


def test_progress_says_step_speed_and_eta_at_most_every_interval(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(cpu.time, "perf_counter", lambda: clock[0])
    lines: list[str] = []
    progress = cpu.Progress(lines.append, epochs=4, total_steps=80, batch_size=2)
    progress.begin_epoch(2, steps=20, first_step=21)
    clock[0] += 5.0
    progress.step(21)  # too soon: nothing
    clock[0] += cpu.PROGRESS_SECONDS  # 20 s for 4 steps: 5 s a step, 0.4 images/s, 76 steps left
    progress.step(24)
    assert lines == ["epoch 2/4: step 4/20 (run 24/80), 0.40 images/s, ETA 4 min 40 s"]
    clock[0] += 1.0
    progress.step(25)
    assert len(lines) == 1
