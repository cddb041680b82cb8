"""MLflow tracking of training runs, read back through MlflowClient from the SQLite store."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap

import mlflow
import pytest
from mlflow.store.db.utils import _get_latest_schema_revision
from mlflow.tracking import MlflowClient
from PIL import Image

from lora_pipeline.core.datasets.snapshot.manifest import (
    read_manifest,
    read_snapshot_info,
    write_manifest,
    write_snapshot_info,
)
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import mlflow_tracking_uri
from lora_pipeline.core.training.run.tracking import (
    EXPERIMENT,
    TrainingTracker,
    batch_filter,
    loss_curve_png,
    open_store,
)
from lora_pipeline.core.training.run.trainer import train_lora
from lora_pipeline_tests.helpers import STARTED_AT, tiny_recipe

TAGS = {"dagster_run_id": "dagster-123", "partition_key": "train-v1|tiny", "code_commit": "abc123"}


def _client(root) -> MlflowClient:
    return _client_at(root.mlflow)


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
    assert set(run.data.params) == {*recipe.resolved(), "effective_batch_size"}  # train_batch_size x accumulation
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


def _take_from_batch(root, version: str, batch: str, images: set[str]) -> None:
    """Rewrite a hand-built snapshot's manifest so that `images` (file names) came from `batch`."""
    snapshot = root.dataset(version)
    rows = [r.model_copy(update={"source_batch": batch}) if r.path.rsplit("/", 1)[-1] in images else r
            for r in read_manifest(snapshot)]
    for name in ("manifest.jsonl", "snapshot.json"):
        (snapshot / name).chmod(0o644)
    info = read_snapshot_info(snapshot)
    write_snapshot_info(snapshot, info.model_copy(update={"manifest_root": write_manifest(snapshot, rows)}))


def test_runs_carry_version_recipe_batches_and_manifest_root_and_search_finds_the_runs_of_a_batch(train_snapshot):
    root = train_snapshot("two-batches-v1", n=4)
    _take_from_batch(root, "two-batches-v1", "b2", {"im2.png", "im3.png"})
    train_snapshot("one-batch-v1", n=2)  # all from b1
    runs = {}
    for version in ("two-batches-v1", "one-batch-v1"):
        result = train_lora(root, version, tiny_recipe(epochs=1), out_dir=root.loras(version, "tiny"),
                            provenance={}, tracker=TrainingTracker(root.mlflow, tags=TAGS), log=lambda _: None,
                            started_at=STARTED_AT, device="cpu")
        runs[version] = result.mlflow_run_id
    client = _client(root)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not MLflow's GenAI mode
    tags = client.get_run(runs["two-batches-v1"]).data.tags
    snapshot = read_snapshot_info(root.dataset("two-batches-v1"))
    assert {"dataset_version": "two-batches-v1", "recipe": "tiny", "manifest_root": snapshot.manifest_root,
            "lora_pipeline.batch.b1": "1", "lora_pipeline.batch.b2": "1"}.items() <= tags.items()
    assert sorted(k for k in tags if k.startswith("lora_pipeline.batch.")) == ["lora_pipeline.batch.b1",
                                                                               "lora_pipeline.batch.b2"]

    def used(batch: str) -> set[str]:
        return {r.info.run_id for r in client.search_runs([experiment.experiment_id], batch_filter(batch))}

    assert used("b2") == {runs["two-batches-v1"]}
    assert used("b1") == set(runs.values())
    assert used("b3") == set()
    assert {r.info.run_id for r in client.search_runs(
        [experiment.experiment_id], "tags.dataset_version = 'one-batch-v1' and tags.recipe = 'tiny'")} == {
        runs["one-batch-v1"]}


def test_an_experiment_made_before_its_kind_was_tagged_gets_the_tag(tmp_path):
    client = MlflowClient(tracking_uri=open_store(tmp_path / "mlflow"))
    made = client.create_experiment(EXPERIMENT)
    assert "mlflow.experimentKind" not in client.get_experiment(made).tags
    assert TrainingTracker(tmp_path / "mlflow").experiment_id() == made
    assert client.get_experiment(made).tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_failure_ends_the_run_failed_and_propagates(tmp_path):
    tracker = TrainingTracker(tmp_path / "mlflow")
    with pytest.raises(RuntimeError, match="boom"), tracker.run("v/r", params={"seed": 1}) as run_id:
        raise RuntimeError("boom")
    assert MlflowClient(tracking_uri=mlflow_tracking_uri(tmp_path / "mlflow")).get_run(run_id).info.status == "FAILED"


def test_a_resumed_run_continues_and_logs_only_new_steps(tmp_path):
    mlflow_dir = tmp_path / "mlflow"
    first = TrainingTracker(mlflow_dir, tags={"dagster_run_id": "one"})
    with pytest.raises(KeyboardInterrupt), first.run("v/r", params={"seed": 1}) as run_id:
        first.log_steps([1.0, 0.9, 0.8], [0.1, 0.1, 0.1])
        raise KeyboardInterrupt
    client = MlflowClient(tracking_uri=mlflow_tracking_uri(mlflow_dir))
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


# A process that creates the store the way MLflow does and is SIGKILLed inside the first schema migration,
# after its `ALTER TABLE metrics ADD COLUMN step` committed: the state a kill during the first `train` left.
KILLED_IN_MIGRATION = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from alembic.operations import Operations

    Operations.batch_alter_table = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if sys.argv[2] == "plain":
        from mlflow.tracking import MlflowClient
        MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}/mlflow.db").search_experiments()
    else:
        from lora_pipeline.core.training.run.tracking import TrainingTracker
        TrainingTracker(Path(sys.argv[1])).client
    """
)


def _killed_in_migration(mlflow_dir, how: str) -> None:
    mlflow_dir.mkdir(parents=True, exist_ok=True)
    child = subprocess.run([sys.executable, "-c", KILLED_IN_MIGRATION, str(mlflow_dir), how], capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr


def _record_a_run(mlflow_dir, lines: list[str]) -> str:
    tracker = TrainingTracker(mlflow_dir, log=lines.append)
    with tracker.run("v/r", params={"seed": 1}) as run_id:
        tracker.log_steps([0.5], [1e-3])
    return run_id


def test_a_store_half_created_by_a_killed_process_is_replaced_in_one_line(tmp_path):
    mlflow_dir = tmp_path / "mlflow"
    _killed_in_migration(mlflow_dir, "plain")
    plain = subprocess.run(  # the bricked state: plain MLflow fails on it (in another process: MLflow caches engines)
        [sys.executable, "-c", "import sys; from mlflow.tracking import MlflowClient; "
         "MlflowClient(tracking_uri=sys.argv[1]).search_experiments()", mlflow_tracking_uri(mlflow_dir)],
        capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and "duplicate column name: step" in plain.stderr
    lines: list[str] = []
    run_id = _record_a_run(mlflow_dir, lines)
    assert lines == [f"{mlflow_dir / 'mlflow.db'}: MLflow store was left half-created (schema revision none, "
                     f"MLflow {mlflow.__version__} needs {_get_latest_schema_revision()}, no runs): "
                     "replacing it with a new one"]
    assert _client_at(mlflow_dir).get_run(run_id).info.status == "FINISHED"


def test_a_kill_while_the_store_is_created_leaves_no_store_and_the_next_run_works(tmp_path):
    mlflow_dir = tmp_path / "mlflow"
    _killed_in_migration(mlflow_dir, "ours")
    assert not (mlflow_dir / "mlflow.db").exists()  # only the temp file the killed creator was filling
    assert [p.name for p in mlflow_dir.glob(".mlflow.db.*.tmp")]
    lines: list[str] = []
    run_id = _record_a_run(mlflow_dir, lines)
    assert lines == [] and not list(mlflow_dir.glob(".mlflow.db.*.tmp"))
    assert _client_at(mlflow_dir).get_run(run_id).data.metrics["loss"] == 0.5


def test_an_unfinished_schema_with_runs_is_one_line_and_left_alone(tmp_path):
    mlflow_dir = tmp_path / "mlflow"
    _record_a_run(mlflow_dir, [])
    db = mlflow_dir / "mlflow.db"
    with sqlite3.connect(db) as conn:  # as if a migration to this MLflow's schema had stopped half-way
        conn.execute("UPDATE alembic_version SET version_num = '451aebb31d03'")
    before = db.read_bytes()
    with pytest.raises(UserError, match=r"mlflow\.db: MLflow store has an unfinished or older schema "
                                        r"\(schema revision 451aebb31d03, .*\) and holds 1 run\(s\)"):
        TrainingTracker(mlflow_dir).experiment_id()  # the store opens on first use
    assert db.read_bytes() == before


def _client_at(mlflow_dir) -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow_tracking_uri(mlflow_dir))
