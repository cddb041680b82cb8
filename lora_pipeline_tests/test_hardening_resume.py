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
