"""Resuming after a training stopped at an awkward moment (issue 27): stopped while an epoch's sample strip was
being written, the resumed run renders that strip (the same picture as an uninterrupted run's)."""

from __future__ import annotations

import pytest

from lora_pipeline.core.training.run import samples
from lora_pipeline.core.training.run.samples import strip_path
from lora_pipeline_tests.helpers import tiny_recipe, train

SAMPLED = {"epochs": 2, "sample_prompts": ("trg, red body",), "sample_every_n_epochs": 1, "sample_steps": 2}


def test_a_strip_whose_rendering_was_interrupted_is_rendered_on_resume(train_snapshot, monkeypatch):
    root = train_snapshot(n=4, repeats=2)
    recipe = tiny_recipe(**SAMPLED)
    clean, _ = train(root, recipe, "clean")
    first = strip_path(root.root / "stopped", "train-v1", "tiny", 1)
    real_save = samples.save_png

    def stopped_while_writing(image, path):  # Ctrl-C (or a kill) while epoch 1's strip is written
        if path == first:
            raise KeyboardInterrupt
        return real_save(image, path)

    monkeypatch.setattr(samples, "save_png", stopped_while_writing)
    with pytest.raises(KeyboardInterrupt):
        train(root, recipe, "stopped")
    monkeypatch.setattr(samples, "save_png", real_save)
    assert (root.root / "stopped" / "train-v1-tiny-e001.safetensors").is_file() and not first.exists()

    resumed, lines = train(root, recipe, "stopped")
    assert resumed.resumed_from_epoch == 1 and lines[0].startswith("resuming train-v1/tiny after epoch 1/2")
    clean_first = strip_path(root.root / "clean", "train-v1", "tiny", 1)
    assert first.read_bytes() == clean_first.read_bytes()  # before the fix: never rendered
    assert resumed.sample_strip is not None and resumed.sample_strip.read_bytes() == clean.sample_strip.read_bytes()


def test_a_training_the_automation_asked_for_and_that_was_killed_is_asked_for_again(sample_root):
    import os
    import signal
    import subprocess
    import sys
    import time

    import dagster as dg

    from lora_pipeline.core.training.run.checkpoint import state_path
    from lora_pipeline.defs.partitions import training_key
    from lora_pipeline.defs.run_health import fail_dead_runs
    from lora_pipeline.runs.instance import definitions, instance
    from lora_pipeline.runs.jobs import run_job

    family, recipe = "hardware-curated", "demo-tiny"  # the demo-tiny recipe has train_on: [hardware-curated]
    version = f"{family}-v1"
    inst, defs = instance(), definitions()

    def requested(cursor):
        result = dg.evaluate_automation_conditions(defs=defs, instance=inst, cursor=cursor)
        return {str(p) for p in result.get_requested_partitions(dg.AssetKey("lora_epochs"))}, result.cursor

    inst.add_dynamic_partitions("source_batches", sample_root.ready_batches())
    inst.add_dynamic_partitions("recipes", sample_root.recipe_names())
    _, cursor = requested(None)
    inst.add_dynamic_partitions("dataset_versions", [version])  # a new version of the family, built
    # the training partition train_on asks for, as the sensors register it
    inst.add_dynamic_partitions("training_runs", [training_key(version, recipe)])
    run_job("build_dataset_job", version, inst, quiet=True)
    key = str(training_key(version, recipe))
    asked, cursor = requested(cursor)
    assert asked == {key}
    asked, cursor = requested(cursor)  # the daemon's next tick, while the run starts: asked once
    assert asked == set()

    # the requested training, killed once it saved its first epoch (2 epochs)
    command = [sys.executable, "-m", "lora_pipeline.cli", "train", version, "--recipe", recipe]
    child = subprocess.Popen(command, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = state_path(sample_root.loras(version, recipe))
    deadline = time.monotonic() + 300
    while not state.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL and state.exists()
    assert fail_dead_runs(inst, lambda line: None)  # as the next command or the daemon's run monitoring does

    asked, cursor = requested(cursor)
    assert asked == {key}  # before the fix: never again, until a person ran `train`
    asked, cursor = requested(cursor)
    assert asked == set()  # once per stop, not every tick
