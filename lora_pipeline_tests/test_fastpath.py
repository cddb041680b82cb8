"""The fast path on CPU: the same code as on a GPU (static buffers, copies, the learning rate as a tensor, one
recorded step per batch shape replayed), with the graph replaced by calling the recorded step again; the
trainer's recipe switch, timings and warm-up bookkeeping."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.models.loading import host_to_device
from lora_pipeline.core.training.recipe import parse_recipe
from lora_pipeline.core.training.recipe_checks import fast_path_blockers
from lora_pipeline.core.training.run.distributed import refusal
from lora_pipeline.core.training.step.fastpath import fast_path_choice
from lora_pipeline_tests.helpers import TINY, Crash, assert_same_tensors, crash_after, tiny_recipe, train

CPU = torch.device("cpu")


def test_host_to_device_is_a_plain_copy_off_cuda():
    tensor = torch.arange(6)
    moved = host_to_device(tensor, CPU)
    assert moved.device == CPU and torch.equal(moved, tensor)


def test_fast_path_trains_byte_identically_and_reports_its_warm_up(train_snapshot):
    # 4 images of 4 aspect ratios, 2 repeats, batch 2: one batch per bucket per epoch, so over 3 epochs every shape
    # is met eagerly, then recorded, then replayed; a cosine schedule changes the learning rate at every step,
    # which the replayed step must read from its tensor.
    root = train_snapshot(n=4, repeats=2)
    recipe = tiny_recipe(epochs=3, save_every_n_epochs=1, optimizer="AdamW", learning_rate=1e-2,
                         lr_scheduler="cosine", validation_split=0.0)
    plain, _ = train(root, recipe, "plain")
    fast, lines = train(root, replace(recipe, fast_path=True), "fast")
    assert (plain.fast_path, fast.fast_path) == (False, True)
    # every shape's eager step and recording are taken before the first epoch, and undone (run/warmup.py)
    assert [line for line in lines if re.match(r"warm-up of [34] batch shape\(s\) took ", line)], lines
    assert len({lr for lr in plain.lr_history}) == len(plain.lr_history)  # the schedule moved every step
    assert fast.loss_history == plain.loss_history and fast.lr_history == plain.lr_history
    for fast_epoch, plain_epoch in zip(fast.epochs, plain.epochs, strict=True):
        assert_same_tensors(fast_epoch["file"], plain_epoch["file"])
    for result in (plain, fast):
        timings = result.timings
        assert {"load", "latent_caching", "text_encoding", "training_steps", "shape_warmup", "saving",
                "time_to_first_step", "data", "base_model_hash", "network", "optimizer", "loss_curve"} <= set(timings)
        assert timings["network"] > 0 and timings["loss_curve"] > 0  # host stages that always do work
        assert all(value >= 0 for value in timings.values())
    # eager: the first step at each shape, part of the steps; the fast path: every shape warmed up ahead of them
    assert 0 < plain.timings["shape_warmup"] <= plain.timings["training_steps"] + plain.timings["text_encoding"]
    assert plain.timings["warmup_ahead"] == 0 and fast.timings["warmup_ahead"] > 0
    assert fast.timings["shape_warmup"] == 0


def test_dadapt_replayed_from_its_recording_keeps_adapting(train_snapshot):
    # Killed after epoch 1 and resumed: the first call's warm-up ahead puts DAdaptAdamW's fresh state back (zeros,
    # d0), the second's the state it loaded (d, moments); both runs' steps then equal the eager run's.
    root = train_snapshot(n=4, repeats=2)
    recipe = tiny_recipe(epochs=3, validation_split=0.0)  # DAdaptAdamW, lr 1.0: d grows in place
    plain, _ = train(root, recipe, "plain")
    with pytest.raises(Crash):
        train(root, replace(recipe, fast_path=True), "fast", log=crash_after(1))
    fast, lines = train(root, replace(recipe, fast_path=True), "fast")
    assert fast.resumed_from_epoch == 1 and any(line.startswith("warm-up of ") for line in lines)
    assert fast.lr_history == plain.lr_history and plain.lr_history[-1] > plain.lr_history[0]
    for fast_epoch, plain_epoch in zip(fast.epochs, plain.epochs, strict=True):
        assert_same_tensors(fast_epoch["file"], plain_epoch["file"])


@pytest.mark.parametrize("override, reason", [
    ({"optimizer": "Lion"}, "Lion reads values back to the host"),
    ({"optimizer": "Adafactor"}, "Adafactor reads values back to the host"),
])
def test_fast_path_is_refused_where_a_step_cannot_be_captured(tmp_path, override, reason):
    path = tmp_path / "r.yaml"
    with pytest.raises(UserError, match=reason) as caught:
        parse_recipe({**{k: v for k, v in TINY.items() if k != "name"}, **override, "fast_path": True}, path)
    assert "fast_path" in str(caught.value) and str(path) in str(caught.value)
    assert fast_path_blockers(tiny_recipe(**override))


def test_the_recipe_hash_counts_the_fast_path_only_when_required():
    # Unset (on wherever it can be) and false train the same tensors (bit for bit on an H200 with deterministic
    # kernels, benchmarks/RESULTS.md) and hash as recipes did before the field existed; true, which refuses recipes
    # it cannot run, counts as it always did.
    recipe = tiny_recipe()
    assert recipe.fast_path is None and replace(recipe, fast_path=False).sha256 == recipe.sha256
    assert replace(recipe, fast_path=True).sha256 != recipe.sha256


def test_unset_fast_path_is_on_for_one_cuda_gpu_wherever_the_step_can_be_captured():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    recipe = tiny_recipe()
    assert fast_path_choice(recipe, cuda, 1)[0] is True
    for captured in ({"masked_loss": True}, {"ip_noise_gamma": 0.1}, {"gradient_accumulation_steps": 2},
                     {"gradient_checkpointing": True}, {"optimizer": "Prodigy"}, {"optimizer": "AdamW8bit"},
                     {"network_train_unet_only": False}):
        assert fast_path_choice(tiny_recipe(**captured), cuda, 1)[0] is True
    eager = {
        "a CUDA GPU": fast_path_choice(recipe, cpu, 1),
        "Lion": fast_path_choice(tiny_recipe(optimizer="Lion"), cuda, 1),
        "blocks_to_swap": fast_path_choice(tiny_recipe(base_model="tiny-flux", model_family="flux1",
                                                       blocks_to_swap=1), cuda, 1),
        "2 processes": fast_path_choice(recipe, cuda, 2),
    }
    for reason, (on, why) in eager.items():
        assert not on and why.startswith("fast_path unset: the eager step, since") and reason in why
    assert fast_path_choice(replace(recipe, fast_path=False), cuda, 1) == (False, "fast_path: false (the recipe)")
    assert fast_path_choice(replace(recipe, fast_path=True), cpu, 1)[0] is True


def test_one_answer_for_the_parser_the_launcher_and_the_unset_choice(tmp_path):
    cuda = torch.device("cuda")
    recipe = tiny_recipe()
    assert fast_path_blockers(recipe) == fast_path_blockers(recipe, cuda, 1) == []
    every = fast_path_blockers(tiny_recipe(optimizer="Lion"), CPU, 2)
    assert [reason.split()[:2] for reason in every] == [["the", "device"], ["Lion", "reads"], ["2", "processes"]]
    (ddp,) = fast_path_blockers(recipe, processes=2)
    assert ddp in refusal(tiny_recipe(fast_path=True), 2, None)
    assert fast_path_choice(recipe, cuda, 2)[1].endswith(f"since {ddp}")
    (lion,) = fast_path_blockers(tiny_recipe(optimizer="Lion"))
    with pytest.raises(UserError, match="impossible here") as caught:
        parse_recipe({**{k: v for k, v in TINY.items() if k != "name"}, "optimizer": "Lion", "fast_path": True},
                     tmp_path / "r.yaml")
    assert str(caught.value).endswith(f"fast_path: true is impossible here: {lion}")
