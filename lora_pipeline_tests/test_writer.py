"""Saving off the training thread (run/writer.py): jobs in order, a failed job fails the run with its own error and
nothing is written after it, leaving the block waits for what was submitted; snapshots are copies."""

from __future__ import annotations

import threading
import time
import weakref

import pytest
import torch

from lora_pipeline.core.training.run.checkpoint import load_state
from lora_pipeline.core.training.run.writer import BackgroundWriter, to_host
from lora_pipeline_tests.helpers import tiny_recipe, train

CPU = torch.device("cpu")


def test_jobs_run_in_order_off_the_training_thread():
    done: list[tuple[int, str]] = []
    gate = threading.Event()
    with BackgroundWriter(CPU) as writer:
        writer.submit(gate.wait)  # the training thread goes on while the writer is busy
        for n in range(5):
            writer.submit(lambda n=n: done.append((n, threading.current_thread().name)))
        assert done == []
        gate.set()
    assert done == [(n, "lora-writer") for n in range(5)]


def test_a_finished_job_and_its_snapshot_are_released_before_the_next_job_arrives():
    snapshot = torch.ones(1000)  # what a save job holds: the host copies of the LoRA and its optimizer state
    released = weakref.ref(snapshot)
    with BackgroundWriter(CPU) as writer:
        writer.submit(lambda tensors=snapshot: tensors.sum())
        del snapshot
        deadline = time.monotonic() + 10
        while released() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert released() is None  # freed while the writer waits for the next job, not held for an epoch


def test_a_failed_job_is_raised_on_the_training_thread_and_later_jobs_are_dropped():
    done: list[int] = []
    writer = BackgroundWriter(CPU)
    writer.submit(lambda: done.append(1))
    writer.submit(lambda: (_ for _ in ()).throw(OSError(28, "No space left on device", "/x/e001.safetensors")))
    writer.submit(lambda: done.append(3))  # e.g. the resume state after the failed epoch file: never written
    with pytest.raises(OSError) as failed:
        writer.wait()
    assert failed.value.filename == "/x/e001.safetensors" and done == [1]
    with pytest.raises(OSError):
        writer.submit(lambda: done.append(4))  # the next epoch's save raises it too
    assert done == [1]


def test_leaving_on_a_training_error_waits_for_the_submitted_jobs():
    done: list[int] = []
    gate = threading.Event()
    with pytest.raises(KeyError) as stopped, BackgroundWriter(CPU) as writer:
        writer.submit(gate.wait)
        writer.submit(lambda: done.append(1))
        writer.submit(lambda: 1 / 0)
        gate.set()
        raise KeyError("training failed")
    assert done == [1]
    assert stopped.value.__notes__ == ["the background writer failed too: ZeroDivisionError('division by zero')"]


def test_snapshots_are_copies_that_training_may_change():
    weight = torch.ones(3)
    state = {"state": {0: {"exp_avg": weight, "step": torch.tensor(2.0)}}, "param_groups": [{"lr": 1.0, "params": [0]}]}
    copied = to_host(state, pinned=False)
    weight.add_(1)
    state["param_groups"][0]["params"].append(1)
    assert torch.equal(copied["state"][0]["exp_avg"], torch.ones(3))
    assert copied["param_groups"] == [{"lr": 1.0, "params": [0]}]


def test_a_failed_background_write_fails_the_run_and_nothing_is_written_after_it(train_snapshot):
    root = train_snapshot(n=4, repeats=1)
    out = root.root / "blocked"
    (out / "train-v1-tiny-e002.safetensors").mkdir(parents=True)  # epoch 2's file cannot be renamed into place
    with pytest.raises(IsADirectoryError) as failed:
        train(root, tiny_recipe(epochs=2, validation_split=0.0), "blocked")
    assert "train-v1-tiny-e002.safetensors" in str(failed.value)
    assert sorted(p.name for p in out.glob("*.safetensors") if p.is_file()) == ["train-v1-tiny-e001.safetensors"]
    state = load_state(out)
    assert state is not None and state.epoch == 1  # the state vouches for epoch 1 only
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_host_buffers_are_separate_views_of_one_block_per_dtype_that_files_write_as_separate_tensors(tmp_path):
    import safetensors.torch

    from lora_pipeline.core.training.run.writer import host_buffers

    tensors = {"down": torch.randn(4, 3, dtype=torch.bfloat16), "alpha": torch.tensor(8.0),
               "empty": torch.zeros(0, 5), "mask": torch.tensor([True, False, True]),
               "step": torch.tensor(7, dtype=torch.int64), "up": torch.randn(3, 4)}
    views = host_buffers(list(tensors.values()), pinned=False)
    assert len({v.untyped_storage().data_ptr() for v in views}) == 4  # one allocation per dtype
    for view, tensor in zip(views, tensors.values(), strict=True):
        assert (view.shape, view.dtype) == (tensor.shape, tensor.dtype)
        assert view.data_ptr() % 64 == 0
        view.copy_(tensor)
    copies = dict(zip(tensors, views, strict=True))
    for name, tensor in tensors.items():  # no view overwrote another
        assert torch.equal(copies[name], tensor), name
    loaded = safetensors.torch.load(safetensors.torch.save(copies))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    torch.save(copies, tmp_path / "state.pt")
    assert all(torch.equal(torch.load(tmp_path / "state.pt")[name], t) for name, t in tensors.items())
