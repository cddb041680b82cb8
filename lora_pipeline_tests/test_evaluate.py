"""evaluate_lora end to end on the tiny models: grids, validation loss, recommendation, MLflow, determinism."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import load_file, save_file

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.evaluation import evaluate_lora
from lora_pipeline.core.evaluation.grid import column_labels, plan_grid
from lora_pipeline.core.evaluation.recommend import fmt
from lora_pipeline.core.models.loading import load_base_model
from lora_pipeline.core.models.sampling import load_pipeline, loaded_lora, sample
from lora_pipeline.core.paths import mlflow_tracking_uri
from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline.core.training.run.tracking import TrainingTracker, batch_filter
from lora_pipeline.core.training.run.trainer import train_lora

PROMPTS = ("trg, red body, matte finish", "trg, blue body, glossy finish")
TINY = {"name": "tiny", "base_model": "tiny-sd", "model_family": "sd15", "resolution": 64, "min_bucket_reso": 32,
        "max_bucket_reso": 128, "bucket_reso_steps": 16, "epochs": 3, "train_batch_size": 2, "network_dim": 4,
        "network_alpha": 2.0, "mixed_precision": "no", "validation_split": 0.2, "sample_prompts": PROMPTS,
        "sample_steps": 2, "eval_weights": (0.6, 0.8, 1.0, 1.2)}


def tiny_recipe(**overrides) -> Recipe:
    return Recipe(**{**TINY, **overrides})


def evaluate(root, recipe):
    lines: list[str] = []
    return evaluate_lora(root, "train-v1", recipe, log=lines.append, device="cpu"), lines


def cells(path: Path, result, prompt: str) -> list[list[np.ndarray]]:
    """Slice a written grid back into its cells with the layout compose_grid used."""
    layout = plan_grid((64, 64), [f"epoch {e}" for e in result.epochs], column_labels(result.weights), prompt)
    with Image.open(path) as image:
        assert image.size == (layout.width, layout.height)
        pixels = np.asarray(image.convert("RGB"))
    return [[pixels[y0:y1, x0:x1] for x0, y0, x1, y1 in
             (layout.cell_box(r, c) for c in range(len(result.weights) + 1))] for r in range(len(result.epochs))]


def test_grids_losses_recommendation_and_mlflow_on_tiny_sd(train_snapshot, lora_epochs):
    root = train_snapshot(n=5)
    recipe = tiny_recipe()
    training_run = lora_epochs(root, recipe, epochs=3)
    result, lines = evaluate(root, recipe)

    out = root.evals("train-v1", "tiny")
    assert result.epochs == [1, 2, 3] and result.weights == [0.6, 0.8, 1.0, 1.2]
    assert result.grid_paths == [out / "grid_0.png", out / "grid_1.png"]
    for path, prompt in zip(result.grid_paths, PROMPTS, strict=True):
        grid = cells(path, result, prompt)
        assert len(grid) == 3 and all(len(r) == 5 for r in grid)
        for row in grid:
            assert all((row[0] == grid[0][0]).all() for _ in row)  # the base column is one image for all epochs
            for c in range(1, 5):  # every weight column differs from the base and from every other column
                assert (row[c] != row[0]).any()
                assert all((row[c] != row[d]).any() for d in range(1, 5) if d != c)

    rows = result.loss_rows
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # training loss: the run's per-step metric averaged per epoch (4 steps each, 1.0 - 0.01 * step index)
    assert [r["train_loss"] for r in rows] == [0.985, 0.945, 0.905]
    assert all(np.isfinite(r["val_loss"]) for r in rows)
    assert len({r["val_loss"] for r in rows}) == 3

    report = json.loads(result.recommendation_json.read_text())
    assert report == result.recommendation
    epoch = report["recommended_epoch"]
    assert epoch in result.epochs and report["grid_row"] == result.epochs.index(epoch) + 1
    assert report["recommended_file"] == f"loras/train-v1/tiny/train-v1-tiny-e{epoch:03d}.safetensors"
    assert report["validation"]["held_out"] is True and len(report["validation"]["images"]) == 1
    assert report["training_run_id"] == training_run
    reasons = " ".join(report["reasons"])
    assert f"{fmt(min(r['val_loss'] for r in rows))} at epoch" in reasons
    assert any(fmt(r["val_loss"]) in reasons for r in rows if r["epoch"] == epoch)
    for row in report["epochs"]:  # every column has an effect on the image
        assert all(d > 0 for d in row["distance_to_base"].values()) and row["break_ratio"] > 0
    assert result.recommendation_json.read_text() == json.dumps(report, indent=2, sort_keys=True,
                                                                ensure_ascii=False) + "\n"  # sorted keys
    assert f"recommended epoch {epoch}" in result.summary_markdown
    assert result.recommendation_md.read_text() == result.summary_markdown
    for r in rows:
        assert fmt(r["val_loss"]) in result.summary_markdown and fmt(r["train_loss"]) in result.summary_markdown
    assert result.val_loss_plot == out / "val_loss.png" and result.val_loss_plot.read_bytes()[:4] == b"\x89PNG"
    assert lines[-1].startswith(f"recommended epoch {epoch}") and result.seconds > 0
    assert {"load", "validation_inputs", "pipeline", "sampling", "adapters", "validation_loss", "writing",
            "tracking"} == set(result.timings)
    assert result.timings["sampling"] > 0 and sum(result.timings.values()) <= result.seconds

    client = MlflowClient(mlflow_tracking_uri(root.mlflow))
    run = client.get_run(result.mlflow_run_id)
    assert run.info.run_name == "train-v1/tiny/eval" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == training_run
    assert run.data.tags["recommended_epoch"] == str(epoch)
    manifest_root = json.loads((root.dataset("train-v1") / "snapshot.json").read_text())["manifest_root"]
    assert run.data.tags["lora_pipeline.batch.b1"] == "1" and run.data.tags["manifest_root"] == manifest_root
    assert result.mlflow_run_id in {r.info.run_id for r in client.search_runs(
        [run.info.experiment_id], filter_string=batch_filter("b1"))}
    history = client.get_metric_history(result.mlflow_run_id, "val_loss")
    assert sorted((m.step, m.value) for m in history) == [(r["epoch"], r["val_loss"]) for r in rows]
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"grid_0.png", "grid_1.png", "val_loss.png", "recommendation.json", "recommendation.md"} <= artifacts
    assert client.get_run(training_run).data.tags["eval.recommended_epoch"] == str(epoch)

    # a second evaluation writes the very same bytes (and a second MLflow run)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again, _ = evaluate(root, recipe)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert again.mlflow_run_id != result.mlflow_run_id


def test_subset_of_epochs_without_held_out_images_is_flagged(train_snapshot, lora_epochs):
    root = train_snapshot(n=3)
    recipe = tiny_recipe(validation_split=0.0, eval_max_epochs=2, sample_prompts=PROMPTS[:1],
                         eval_weights=(0.5, 1.0))
    lora_epochs(root, recipe, epochs=4)
    (root.evals("train-v1", "tiny")).mkdir(parents=True)
    stale = root.evals("train-v1", "tiny") / "grid_3.png"
    stale.write_bytes(b"old")
    result, lines = evaluate(root, recipe)
    assert result.epochs == [2, 4] and [p.name for p in result.grid_paths] == ["grid_0.png"]
    assert not stale.exists()
    report = result.recommendation
    assert report["validation"]["held_out"] is False and len(report["validation"]["images"]) == 3
    assert "NO held-out image" in report["validation"]["note"] and "NO held-out image" in result.summary_markdown
    assert any("holds no image out" in line for line in lines)
    assert report["saved_epochs"] == [1, 2, 3, 4]
    assert "lack a weight below, at and above 1.0" in report["basis"]  # 0.5 and 1.0 only
    assert len(cells(result.grid_paths[0], result, PROMPTS[0])) == 2


def test_tiny_sdxl(train_snapshot, lora_epochs):
    root = train_snapshot(n=3)
    recipe = tiny_recipe(base_model="tiny-sdxl", model_family="sdxl", sample_prompts=PROMPTS[:1],
                         eval_weights=(0.8, 1.0, 1.2))
    lora_epochs(root, recipe, epochs=2)
    result, _ = evaluate(root, recipe)
    grid = cells(result.grid_paths[0], result, PROMPTS[0])
    assert len(grid) == 2 and all(len(r) == 4 for r in grid)
    assert all((r[c] != r[0]).any() for r in grid for c in (1, 2, 3))
    assert result.recommendation["recommended_epoch"] in (1, 2)
    client = MlflowClient(mlflow_tracking_uri(root.mlflow))
    assert len(client.get_metric_history(result.mlflow_run_id, "val_loss")) == 2


def test_user_errors_name_the_file(train_snapshot, lora_epochs):
    root = train_snapshot(n=3)
    recipe = tiny_recipe()
    with pytest.raises(UserError, match="no trained epochs of train-v1/tiny; train first"):
        evaluate(root, recipe)
    with pytest.raises(UserError, match="has no sample_prompts"):
        evaluate(root, replace(recipe, sample_prompts=()))
    lora_epochs(root, recipe, epochs=1)
    with pytest.raises(UserError, match="trained on base model 'tiny-sd' but recipe tiny now says 'tiny-sdxl'"):
        evaluate(root, replace(recipe, base_model="tiny-sdxl", model_family="sdxl"))


def test_evaluates_what_train_lora_wrote(train_snapshot):
    """The real chain: train_lora's files, headers and MLflow run feed the evaluation."""
    root = train_snapshot(n=4, repeats=1)
    recipe = tiny_recipe(epochs=2, optimizer="AdamW", learning_rate=1e-2, sample_prompts=PROMPTS[:1])
    trained = train_lora(root, "train-v1", recipe, out_dir=root.loras("train-v1", "tiny"), provenance={},
                         tracker=TrainingTracker(root.mlflow), log=lambda _: None, device="cpu")
    result, _ = evaluate(root, recipe)
    assert result.epochs == [1, 2]
    per_epoch = [np.mean(trained.loss_history[i:i + trained.steps_per_epoch])
                 for i in range(0, trained.total_steps, trained.steps_per_epoch)]
    assert [r["train_loss"] for r in result.loss_rows] == pytest.approx(per_epoch, abs=1e-6)
    assert result.recommendation["validation"]["images"] == trained.validation_images
    client = MlflowClient(mlflow_tracking_uri(root.mlflow))
    assert client.get_run(result.mlflow_run_id).data.tags["mlflow.parentRunId"] == trained.mlflow_run_id


def test_tiny_flux_through_flux_pipeline_with_the_flow_validation_loss(train_snapshot):
    """A FLUX.1 LoRA that train_lora wrote (double blocks: diffusers cannot convert a tiny single-block linear1)
    evaluated through FluxPipeline: its base column is the base model's own image, every weight changes it."""
    root = train_snapshot(n=4, repeats=1)
    recipe = tiny_recipe(base_model="tiny-flux", model_family="flux1", epochs=2, optimizer="AdamW",
                         learning_rate=1e-2, train_blocks="double", t5xxl_max_token_length=64, guidance_scale=3.5,
                         sample_prompts=PROMPTS[:1], eval_weights=(0.8, 1.0, 1.2))
    train_lora(root, "train-v1", recipe, out_dir=root.loras("train-v1", "tiny"), provenance={},
               tracker=TrainingTracker(root.mlflow), log=lambda _: None, device="cpu")
    result, _ = evaluate(root, recipe)

    assert result.epochs == [1, 2] and [p.name for p in result.grid_paths] == ["grid_0.png"]
    grid = cells(result.grid_paths[0], result, PROMPTS[0])
    assert all((r[c] != r[0]).any() for r in grid for c in (1, 2, 3))  # each weight changes the base image
    assert all((r[c] != r[d]).any() for r in grid for c in (1, 2, 3) for d in (1, 2, 3) if c != d)
    base = load_base_model(root.models, "tiny-flux", "flux1", t5_max_length=64)
    alone = sample(load_pipeline(base, torch.float32), recipe.sampling, options=base.pipeline_call_options)[0]
    scale = plan_grid((64, 64), ["epoch 1"], column_labels(result.weights), PROMPTS[0]).scale
    assert all(np.array_equal(r[0][::scale, ::scale], alone) for r in grid)
    assert all(np.isfinite(r["val_loss"]) for r in result.loss_rows)
    assert len({r["val_loss"] for r in result.loss_rows}) == 2  # the LoRA, not the draws, differs between epochs
    assert result.recommendation["recommended_epoch"] in (1, 2)


def test_a_tiny_flux_single_block_lora_is_one_line_naming_train_blocks(train_snapshot):
    root = train_snapshot(n=3, repeats=1)
    recipe = tiny_recipe(base_model="tiny-flux", model_family="flux1", epochs=1, optimizer="AdamW",
                         t5xxl_max_token_length=64, sample_prompts=PROMPTS[:1], sample_steps=1)
    train_lora(root, "train-v1", recipe, out_dir=root.loras("train-v1", "tiny"), provenance={},
               tracker=TrainingTracker(root.mlflow), log=lambda _: None, device="cpu")
    with pytest.raises(UserError, match="train_blocks: double"):
        evaluate(root, recipe)


def test_a_flux_t5_lora_is_in_the_grid_though_diffusers_drops_it(train_snapshot, tmp_path):
    """train_t5xxl: diffusers' FLUX loader drops a file's T5 (`lora_te3_`) modules; the grid's weight-1.0 cell is
    the image with them (core/models/t5_lora.py puts them on T5), which differs from the image without them."""
    root = train_snapshot(n=4, repeats=1)
    recipe = tiny_recipe(base_model="tiny-flux", model_family="flux1", epochs=1, optimizer="AdamW",
                         learning_rate=1e-2, train_blocks="double", network_train_unet_only=False, train_t5xxl=True,
                         t5xxl_max_token_length=64, sample_prompts=PROMPTS[:1], eval_weights=(1.0,))
    trained = train_lora(root, "train-v1", recipe, out_dir=root.loras("train-v1", "tiny"), provenance={},
                         tracker=TrainingTracker(root.mlflow), log=lambda _: None, device="cpu")
    result, _ = evaluate(root, recipe)
    scale = plan_grid((64, 64), ["epoch 1"], column_labels(result.weights), PROMPTS[0]).scale
    shown = cells(result.grid_paths[0], result, PROMPTS[0])[0][1][::scale, ::scale]

    base = load_base_model(root.models, "tiny-flux", "flux1", t5_max_length=64)
    pipe = load_pipeline(base, torch.float32)
    path = Path(trained.epochs[-1]["file"])
    without_t5 = tmp_path / "without_t5.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("lora_te3_")}, without_t5)
    images = {}
    for epoch, file in enumerate((path, without_t5), start=1):
        with loaded_lora(pipe, file, epoch) as adapter:
            images[file] = sample(pipe, recipe.sampling, adapter, 1.0, base.pipeline_call_options)[0]
    assert np.array_equal(shown, images[path]) and not np.array_equal(images[path], images[without_t5])
