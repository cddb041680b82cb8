"""Sampling through the stock pipeline with a LoRA loaded the way users load it (core/models/sampling.py)."""

from __future__ import annotations

import numpy as np
import torch

from lora_pipeline.core.models.loading import load_base_model
from lora_pipeline.core.models.sampling import load_pipeline, loaded_lora, sample
from lora_pipeline.core.training.recipe import Recipe


def test_sampling_shares_noise_per_prompt_and_the_lora_weight_changes_the_image(train_snapshot, lora_epochs):
    root = train_snapshot()
    recipe = Recipe(name="r", base_model="tiny-sd", resolution=64, network_dim=4, network_alpha=2.0,
                    sample_prompts=("trg, red body", "trg, blue body"), sample_steps=2)
    lora_epochs(root, recipe, epochs=1)
    base = load_base_model(root.models, "tiny-sd", "sd15", "cpu", torch.float32)
    pipe = load_pipeline(base, torch.float32)
    baseline = sample(pipe, recipe.sampling)
    assert baseline.shape == (2, 64, 64, 3) and baseline.dtype == np.uint8
    assert (sample(pipe, recipe.sampling) == baseline).all()
    path = root.loras("train-v1", "r") / "train-v1-r-e001.safetensors"
    with loaded_lora(pipe, path, 1) as adapter:
        assert adapter == "e1"
        half, full = sample(pipe, recipe.sampling, adapter, 0.5), sample(pipe, recipe.sampling, adapter, 1.0)
        assert (sample(pipe, recipe.sampling, adapter, 0.0) == baseline).all()
    assert (half != baseline).any() and (full != half).any()
    assert pipe.get_list_adapters() == {}  # deleted again
    assert (sample(pipe, recipe.sampling) == baseline).all()
