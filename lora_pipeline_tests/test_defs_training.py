"""End-to-end through the real Dagster definitions: build -> lora_epochs -> evaluation_grid -> provenance."""

from __future__ import annotations

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

from lora_pipeline import dagster_runs
from lora_pipeline.core.datasets.manifest import read_manifest
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_file
from lora_pipeline.core.paths import mlflow_tracking_uri
from lora_pipeline.core.provenance import trace_lora
from lora_pipeline.defs import partitions
from lora_pipeline.defs.partitions import training_key

VERSION = "hardware-design-aesthetic-v1"
RECIPE = "e2e-tiny"


@pytest.fixture
def built(sample_root):
    """v1 built through Dagster, and a 2-epoch copy of the demo recipe."""
    recipe = yaml.safe_load(sample_root.recipe_file("demo-tiny").read_text())
    recipe.update(name=RECIPE, epochs=2, sample_steps=2)
    sample_root.recipe_file(RECIPE).write_text(yaml.safe_dump(recipe))
    inst = dagster_runs.instance()
    partitions.register(inst, partitions.dataset_versions, [VERSION])
    partitions.register(inst, partitions.recipes, [RECIPE])
    dagster_runs.run_job("build_dataset_job", VERSION, inst, quiet=True)
    return sample_root, inst


def test_train_evaluate_and_trace_through_dagster(built):
    root, inst = built
    trained = dagster_runs.run_job("train_job", training_key(VERSION, RECIPE), inst, quiet=True)
    meta = trained.metadata("lora_epochs")
    files = sorted(root.loras(VERSION, RECIPE).glob("*.safetensors"))
    assert [f.name for f in files] == [f"{VERSION}-{RECIPE}-e001.safetensors", f"{VERSION}-{RECIPE}-e002.safetensors"]
    assert meta["epoch_files"] == 2 and "data:image/png;base64," in meta["loss_curve"]
    run = MlflowClient(mlflow_tracking_uri(root.mlflow)).get_run(meta["mlflow_run_id"])
    assert run.info.run_name == f"{VERSION}/{RECIPE}" and run.data.tags["dagster_run_id"] == trained.run_id
    # the partition page answers the provenance question: batches with counts, files, hashes, commit, MLflow run
    manifest = root.dataset(VERSION) / "manifest.jsonl"
    assert meta["provenance"].startswith("ok") and meta["manifest"] == str(manifest)
    assert [r.data for r in meta["source_batches"].records] == [
        {"source": "batch:curated-2026-10", "images": 8, "captions": 8, "changed_or_missing": 0,
         "manifest": str(manifest)}]
    assert {r.data["source_path"] for r in meta["source_files"].records} == {
        r["source_path"] for r in read_manifest(root.dataset(VERSION)) if r["kind"] == "image"}
    header = trace_lora(root, files[-1])
    assert meta["recipe_sha256"] == header["recipe"]["sha256"]
    assert meta["base_model_hash"] == header["base_model"]["hash"]
    assert meta["manifest_root"] == header["dataset"]["snapshot_manifest_root"] and meta["code_commit"]
    assert meta["mlflow_run"].endswith(f"/runs/{meta['mlflow_run_id']}")

    evaluated = dagster_runs.run_job("evaluate_job", training_key(VERSION, RECIPE), inst, quiet=True)
    emeta = evaluated.metadata("evaluation_grid")
    assert {"grid_0", "grid_1", "recommendation", "loss_table", "val_loss"} <= set(emeta)
    assert "data:image/png;base64," in emeta["grid_0"]  # the grid itself renders in the UI
    rec = json.loads((root.evals(VERSION, RECIPE) / "recommendation.json").read_text())
    assert rec["recommended_epoch"] in (1, 2) and emeta["recommended_epoch"] == rec["recommended_epoch"]
    assert emeta["recommended_file"] == str(files[rec["recommended_epoch"] - 1])  # links back to the epoch file

    chain = trace_lora(root, files[-1])
    assert chain["status"] == "ok"
    rows = {r["path"]: r for r in read_manifest(root.dataset(VERSION)) if r["kind"] == "image"}
    assert {i["path"] for i in chain["images"]} == set(rows)
    for image in chain["images"]:  # every image traces to a real source file with that exact hash
        source = root.batch(rows[image["path"]]["source_batch"]) / rows[image["path"]]["source_path"]
        assert sha256_file(source) == rows[image["path"]]["source_sha256"]


def test_lora_epochs_refuses_a_failed_dataset_in_a_separate_run(built):
    root, inst = built
    report = root.dataset(VERSION) / "report.json"
    data = json.loads(report.read_text())
    data["problems"].append({"file": "img/x.png", "code": "truncated_image", "severity": "error", "message": "cut",
                             "scope": f"dataset:{VERSION}"})
    report.chmod(0o644)
    report.write_text(json.dumps(data))
    with pytest.raises(UserError, match="refusing to train"):
        dagster_runs.run_job("train_job", training_key(VERSION, RECIPE), inst, quiet=True)
    assert not list(root.loras(VERSION, RECIPE).glob("*.safetensors"))
