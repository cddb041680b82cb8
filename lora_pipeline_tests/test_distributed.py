"""Training in two processes (DDP over gloo on the CPU, through `accelerate launch`) against one process with the
same global batch, on tiny-sd: same epoch files, LoRA tensors equal within a tolerance, one MLflow run, resume;
how a step is split; what is refused."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.training.run.distributed import refusal, train_distributed
from lora_pipeline.core.training.run.tracking import TrainingTracker
from lora_pipeline.core.training.step.loop import Shard
from lora_pipeline_tests.helpers import PROVENANCE, STARTED_AT, tiny_recipe

# Tolerance, per LoRA weight: |two processes - one process| <= MAX_DIFF everywhere and <= TYPICAL_DIFF for 99% of
# the weights. A process runs the U-Net on its own images and gloo adds the processes' gradients, where one
# process sums the same per-image terms inside its batched backward: the same float32 terms in another order,
# so gradients agree to a few ulps. Where a gradient nearly cancels, that error is a larger share of it, and
# AdamW's normalisation (a step of ~lr = 1e-3 whatever the gradient's size) carries it into the weights. Measured
# on this machine, two processes from scratch against one (this recipe, 8 steps): 99% of the weights within
# 6.4e-8, the largest difference 8.5e-6 (18 of 69,824 weights above 1e-6). Wrong splits measured the same way
# (shares not weighted; each process using the first images' noise) differ by 3e-4 (median) to 6e-3 (max):
# every wrong split moves weights by a sizeable part of a step. (AdamW rather than the default DAdaptAdamW: its
# d-estimate starts at 1e-6, so a few steps move weights by too little to tell.)
MAX_DIFF, TYPICAL_DIFF = 5e-5, 1e-6

# Two images of two aspect ratios (two buckets), each repeated 4 times; global steps of 3 images (micro-batches
# of 1, gradient accumulation 3): per bucket and epoch one step of 3 images, split 1 + 2 (the second process
# runs two micro-batches, all-reducing once), and one step of 1 image, which leaves the second process no image
# (it joins the all-reduce at weight 0). Latents are encoded per step (no cache) with flip_aug and shuffled
# captions, so every per-image draw must follow the image to the process that trains it.
RECIPE = {"epochs": 2, "train_batch_size": 1, "gradient_accumulation_steps": 3, "validation_split": 0.0,
          "optimizer": "AdamW", "learning_rate": 1e-3, "cache_latents": False, "flip_aug": True,
          "shuffle_caption": True}


class Interrupted(Exception):
    """Stops a one-process run after its first epoch (raised by its progress log)."""


def _train(root, out: str, processes: int, stop_after_epoch_1: bool = False, tracked: bool = True):
    recipe = tiny_recipe(**RECIPE)
    tracker = TrainingTracker(root.root / "mlflow", tags={"test": out}) if tracked else None  # MLflow: seconds
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if stop_after_epoch_1 and line.startswith("epoch 1/"):
            raise Interrupted

    result = train_distributed(root, "train-v1", recipe, out_dir=root.root / out,
                               provenance={"code_commit": PROVENANCE["code_commit"]}, num_processes=processes,
                               tracker=tracker, log=log, device="cpu", started_at=STARTED_AT)
    return result, lines, tracker


def _assert_close(file_a: str, file_b: str) -> None:
    a, b = load_file(file_a), load_file(file_b)
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[key] - b[key]).abs().flatten() for key in a])
    assert diffs.max().item() <= MAX_DIFF and torch.quantile(diffs, 0.99).item() <= TYPICAL_DIFF


def test_two_processes_train_like_one_with_the_same_global_batch_and_resume_its_state(train_snapshot) -> None:
    root = train_snapshot(n=2, repeats=4)
    one, _, _ = _train(root, "one", 1, tracked=False)  # the reference: its tensors, files and losses
    assert one.steps_per_epoch == 4 and one.total_steps == 8
    # One launch (each costs two interpreters' imports): one process stops after epoch 1, then two processes
    # resume from the state it wrote (both must read it: a process starting afresh would train other weights,
    # or wait for a partner that never comes) and train epoch 2.
    with pytest.raises(Interrupted):
        _train(root, "two", 1, stop_after_epoch_1=True)
    kept = (root.root / "two" / "train-v1-tiny-e001.safetensors").read_bytes()
    (root.models / "tiny-sd").unlink()  # the launch generates it again (before the processes start; same bytes)
    two, lines, tracker = _train(root, "two", 2)
    assert two.resumed_from_epoch == 1 and two.images_trained == 8 and two.total_steps == one.total_steps
    names = ["train-v1-tiny-e001.safetensors", "train-v1-tiny-e002.safetensors"]
    assert sorted(f.name for f in (root.root / "two").glob("*.safetensors")) == names
    assert [e["file"].rsplit("/", 1)[-1] for e in two.epochs] == [e["file"].rsplit("/", 1)[-1] for e in one.epochs]
    assert (root.root / "two" / names[0]).read_bytes() == kept  # not rewritten
    for a, b in zip(one.epochs, two.epochs, strict=True):
        _assert_close(a["file"], b["file"])
    first, last = load_file(two.epochs[0]["file"]), load_file(two.epochs[1]["file"])
    moved = torch.cat([(last[k] - t).abs().flatten() for k, t in first.items()])
    assert moved.median().item() > 10 * MAX_DIFF  # epoch 2 moved a typical weight far beyond the tolerance
    assert two.loss_history == pytest.approx(one.loss_history, rel=1e-4)  # the processes' shares add up
    client = MlflowClient(tracking_uri=tracker.client.tracking_uri)
    (run,) = client.search_runs([tracker.experiment_id()])  # the interrupted run, continued by the first process
    assert run.info.run_id == two.mlflow_run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 9))
    assert any(line.startswith("epoch 2/2") for line in lines)  # the first process's progress reached the caller


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shards_split_each_step_so_the_averaged_gradient_is_the_steps(world: int) -> None:
    for size in range(1, 9):
        shares = [Shard(rank, world).rows(size) for rank in range(world)]
        covered = [row for start, end, weight in shares if weight for row in range(start, end)]
        assert covered == list(range(size))  # contiguous, in rank order, every image once
        for start, end, weight in shares:
            # DDP averages: (1/world) x weight x mean over the share must be 1/size per image, or 0 without rows
            assert weight == 0.0 and (start, end) == (0, 1) or weight / (world * (end - start)) == pytest.approx(
                1 / size)


def test_what_cannot_train_in_several_processes_is_refused_before_launching(train_snapshot) -> None:
    assert refusal(tiny_recipe(), 1, None) is None and refusal(tiny_recipe(), 2, None) is None
    assert "fast_path" in refusal(tiny_recipe(fast_path=True), 2, None)
    assert "network_train_unet_only" in refusal(tiny_recipe(network_train_unet_only=False), 2, None)
    assert "has 1" in refusal(tiny_recipe(), 2, 1)
    assert refusal(tiny_recipe(), 0, None).startswith("num_processes must be at least 1")
    root = train_snapshot(n=1)
    with pytest.raises(UserError, match="fast_path"):
        train_distributed(root, "train-v1", tiny_recipe(fast_path=True), out_dir=root.root / "out",
                          provenance={}, num_processes=2, device="cpu")
    assert not (root.root / "out").exists()  # refused before anything was written
