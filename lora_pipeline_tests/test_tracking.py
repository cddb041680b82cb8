"""MLflow tracking of training runs, read back through MlflowClient from the SQLite store."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from test_training_trainer import STARTED_AT, tiny_recipe

from lora_pipeline.core.training.tracking import EXPERIMENT, TrainingTracker, loss_curve_png, tracking_uri
from lora_pipeline.core.training.trainer import train_lora

TAGS = {"dagster_run_id": "dagster-123", "partition_key": "train-v1|tiny", "code_commit": "abc123"}


def _client(root) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri(root.mlflow))


def test_training_run_is_recorded_in_mlflow(train_snapshot):
    root = train_snapshot(n=4, repeats=2)
    recipe = tiny_recipe(epochs=2)
    tracker = TrainingTracker(root.mlflow, tags=TAGS)
    result = train_lora(root, "train-v1", recipe, out_dir=root.loras("train-v1", "tiny"),
                        provenance={"code_commit": "abc123"}, tracker=tracker, log=lambda _: None,
                        started_at=STARTED_AT, device="cpu")
    client = _client(root)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.artifact_location == str((root.mlflow / "artifacts").resolve())
    assert (root.mlflow / "mlflow.db").is_file()
    run = client.get_run(result.mlflow_run_id)
    assert run.info.run_name == "train-v1/tiny" and run.info.status == "FINISHED"
    assert run.data.params["network_dim"] == "4" and run.data.params["optimizer"] == "DAdaptAdamW"
    assert run.data.params["eval_weights"] == "[0.6,0.8,1.0,1.2]"
    assert set(run.data.params) == set(recipe.resolved())
    manifest_root = json.loads((root.dataset("train-v1") / "snapshot.json").read_text())["manifest_root"]
    assert {**TAGS, "manifest_root": manifest_root}.items() <= run.data.tags.items()

    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == list(range(1, result.total_steps + 1))
    assert [m.value for m in losses] == pytest.approx(result.loss_history)
    assert len(client.get_metric_history(run.info.run_id, "lr")) == result.total_steps

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    epochs = {a.path for a in client.list_artifacts(run.info.run_id, "epochs")}
    assert "loss_curve.png" in artifacts
    assert epochs == {"epochs/train-v1-tiny-e001.safetensors", "epochs/train-v1-tiny-e002.safetensors"}

    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "train-v1"
    assert dataset_input.dataset.digest == manifest_root[:36]  # MLflow's digest limit is 36 characters
    assert {t.key: t.value for t in dataset_input.tags}["manifest_root"] == manifest_root
    with open(result.epochs[0]["file"], "rb") as f:
        header = f.read(20000)
    assert result.mlflow_run_id.encode() in header  # the run id was known before the first file was written


def test_a_failure_ends_the_run_failed_and_propagates(tmp_path):
    tracker = TrainingTracker(tmp_path / "mlflow")
    with pytest.raises(RuntimeError, match="boom"), tracker.run("v/r", params={"seed": 1}) as run_id:
        raise RuntimeError("boom")
    assert MlflowClient(tracking_uri=tracking_uri(tmp_path / "mlflow")).get_run(run_id).info.status == "FAILED"


def test_a_resumed_run_continues_and_logs_only_new_steps(tmp_path):
    mlflow_dir = tmp_path / "mlflow"
    first = TrainingTracker(mlflow_dir, tags={"dagster_run_id": "one"})
    with pytest.raises(KeyboardInterrupt), first.run("v/r", params={"seed": 1}) as run_id:
        first.log_steps([1.0, 0.9, 0.8], [0.1, 0.1, 0.1])
        raise KeyboardInterrupt
    client = MlflowClient(tracking_uri=tracking_uri(mlflow_dir))
    assert client.get_run(run_id).info.status == "KILLED"

    second = TrainingTracker(mlflow_dir, tags={"dagster_run_id": "two"})
    with second.run("v/r", params={"seed": 1}, resume_run_id=run_id) as resumed:
        second.log_steps([1.0, 0.9, 0.8, 0.7, 0.6], [0.1] * 5)
    assert resumed == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["dagster_run_id"] == "two"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5]

    third = TrainingTracker(mlflow_dir)
    with third.run("v/r", params={"seed": 1}, resume_run_id="no-such-run") as fresh:
        pass
    assert fresh != run_id  # an unknown run id starts a new run


def test_loss_curve_png(tmp_path):
    path = loss_curve_png([1.0 / (1 + i) for i in range(120)], tmp_path / "curve.png", steps_per_epoch=30)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 400)
