"""End-to-end through the real Dagster definitions: build -> lora_epochs -> evaluation_grid -> provenance."""

from __future__ import annotations

import json
import math
import os
from unittest.mock import patch

import dagster as dg
import pytest
import yaml
from mlflow.tracking import MlflowClient

from lora_pipeline import cli as lora_cli
from lora_pipeline.core.datasets.snapshot.manifest import ManifestRow, read_manifest
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_file
from lora_pipeline.core.lineage.provenance import trace_lora
from lora_pipeline.core.paths import mlflow_tracking_uri
from lora_pipeline.core.settings import env_name
from lora_pipeline.core.training.run.tracking import batch_filter
from lora_pipeline.defs import partitions
from lora_pipeline.defs.partitions import training_key
from lora_pipeline.defs.resources import TrainingLauncherResource
from lora_pipeline.runs.instance import instance
from lora_pipeline.runs.jobs import run_job
from lora_pipeline_tests.helpers import DEMO_EPOCHS, DEMO_GROUP, DEMO_RECIPE, DEMO_V2, cli

VERSION, RECIPE = "hardware-design-aesthetic-v1", "demo-tiny"
FLUX_RECIPE = "demo-tiny-flux"
PROCESSES_ENV = env_name("train_processes")


@pytest.fixture
def built(sample_root):
    """v1 built through Dagster."""
    inst = instance()
    partitions.register(inst, partitions.dataset_versions, [VERSION])
    partitions.register(inst, partitions.training_runs, [training_key(VERSION, RECIPE)])
    run_job("build_dataset_job", VERSION, inst, quiet=True)
    return sample_root, inst


def _origin(row: ManifestRow) -> tuple[str, str, str]:
    """(batch, path, sha256) of the source file a manifest image row came from, through any earlier version."""
    if row.origin_batch is not None:
        return row.origin_batch, row.origin_path, row.origin_sha256
    return row.source_batch, row.source_path, row.source_sha256


@pytest.mark.xdist_group(DEMO_GROUP)
def test_train_evaluate_and_trace_through_dagster(trained_demo):
    """The demo partition (v2, which copies v1 and adds a batch) trained and evaluated by train_job and
    evaluate_job (conftest's `trained_demo`, shared with the browser test)."""
    root, trained = trained_demo.root, trained_demo.trained
    version, recipe = DEMO_V2, DEMO_RECIPE
    meta = trained.metadata("lora_epochs")
    files = sorted(root.loras(version, recipe).glob("*.safetensors"))
    assert [f.name for f in files] == [f"{version}-{recipe}-e{e:03d}.safetensors" for e in range(1, DEMO_EPOCHS + 1)]
    assert meta["epoch_files"] == DEMO_EPOCHS and "data:image/png;base64," in meta["loss_curve"]
    assert meta["training_processes"] == 1  # the launcher resource's default: in the step's own process
    run = MlflowClient(mlflow_tracking_uri(root.mlflow)).get_run(meta["mlflow_run_id"])
    assert run.info.run_name == f"{version}/{recipe}" and run.data.tags["dagster_run_id"] == trained.run_id
    # the partition page answers the provenance question: batches with counts, files, hashes, commit, MLflow run
    manifest = root.dataset(version) / "manifest.jsonl"
    images = [r for r in read_manifest(root.dataset(version)) if r.kind == "image"]
    assert meta["provenance"].startswith("ok") and meta["manifest"] == str(manifest)
    assert [r.data for r in meta["source_batches"].records] == [  # v1's images through v1, to their batch
        {"source": "batch:curated-2026-10", "images": 8, "captions": 8, "changed_or_missing": 0,
         "manifest": str(manifest)},
        {"source": "batch:turntable-renders-2026-11", "images": 12, "captions": 12, "changed_or_missing": 0,
         "manifest": str(manifest)}]
    assert {r.data["source_path"] for r in meta["source_files"].records} == {_origin(r)[1] for r in images}
    header = trace_lora(root, files[-1])
    assert meta["recipe_sha256"] == header["recipe"]["sha256"]
    assert meta["base_model_hash"] == header["base_model"]["hash"]
    assert meta["manifest_root"] == header["dataset"]["snapshot_manifest_root"] and meta["code_commit"]
    assert meta["mlflow_run"] == f"http://127.0.0.1:5000/#/runs/{meta['mlflow_run_id']}"  # `make mlflow-ui`
    # MLflow answers "which runs used batch X": v2's run took curated-2026-10 through v1, turntable directly
    client = MlflowClient(mlflow_tracking_uri(root.mlflow))
    for batch in ("curated-2026-10", "turntable-renders-2026-11"):
        found = client.search_runs([run.info.experiment_id], batch_filter(batch))
        assert meta["mlflow_run_id"] in {r.info.run_id for r in found}
    assert not client.search_runs([run.info.experiment_id], batch_filter("masked-closeups-2026-12"))

    emeta = trained_demo.evaluated.metadata("evaluation_grid")
    assert {"grid_0", "grid_1", "recommendation", "loss_table", "val_loss"} <= set(emeta)
    assert "data:image/png;base64," in emeta["grid_0"]  # the grid itself renders in the UI
    rec = json.loads((root.evals(version, recipe) / "recommendation.json").read_text())
    assert rec["recommended_epoch"] in range(1, DEMO_EPOCHS + 1)
    assert emeta["recommended_epoch"] == rec["recommended_epoch"]
    assert emeta["recommended_file"] == str(files[rec["recommended_epoch"] - 1])  # links back to the epoch file
    assert emeta["mlflow_run"] == f"http://127.0.0.1:5000/#/runs/{emeta['mlflow_run_id']}"  # a link, not text

    chain = trace_lora(root, files[-1])
    assert chain["status"] == "ok"
    assert {i["path"] for i in chain["images"]} == {r.path for r in images}
    for row in images:  # every image traces to a real source file with that exact hash
        batch, path, sha = _origin(row)
        assert sha256_file(root.batch(batch) / path) == sha


def test_lora_epochs_refuses_a_failed_dataset_in_a_separate_run(built):
    root, inst = built
    report = root.dataset(VERSION) / "report.json"
    data = json.loads(report.read_text())
    data["problems"].append({"file": "img/x.png", "code": "truncated_image", "severity": "error", "message": "cut",
                             "scope": f"dataset:{VERSION}"})
    report.chmod(0o644)
    report.write_text(json.dumps(data))
    with pytest.raises(UserError, match="refusing to train"):
        run_job("train_job", training_key(VERSION, RECIPE), inst, quiet=True)
    assert not list(root.loras(VERSION, RECIPE).glob("*.safetensors"))
    # the partition's page says it is blocked, why, and links the version's report
    records = inst.fetch_observations(
        dg.AssetRecordsFilter(dg.AssetKey("lora_epochs"), asset_partitions=[training_key(VERSION, RECIPE)]), limit=1)
    text = records.records[0].asset_observation.metadata["blocked"].value
    assert "refusing to train" in text and f"/assets/dataset_report?view=partitions&partition={VERSION}" in text


def test_the_launcher_takes_its_process_count_from_config_then_environment(monkeypatch):
    monkeypatch.delenv(PROCESSES_ENV, raising=False)
    assert TrainingLauncherResource().processes == 1
    monkeypatch.setenv(PROCESSES_ENV, "2")
    assert TrainingLauncherResource().processes == 2
    assert TrainingLauncherResource(num_processes=3).processes == 3  # the run's config wins
    monkeypatch.setenv(PROCESSES_ENV, "two")
    with pytest.raises(UserError, match=PROCESSES_ENV):
        _ = TrainingLauncherResource().processes


def test_flux_demo_trains_evaluates_and_traces_through_the_cli(sample_root, tiny_model, capsys):
    """demo-tiny-flux as `make demo-flux` runs it (cut to 2 epochs and 1 sample step, the spec to 1 repeat): train,
    evaluate (evaluate_job's evaluation_grid: FluxPipeline grids, flow validation loss), then provenance ok.

    `build` and `provenance` run as the console script; `train` and `evaluate` run the same `cli.main` in this
    process (about 25 s less CPU: a new process would import torch, diffusers, transformers and peft again)."""
    os.symlink(tiny_model("tiny-flux"), sample_root.models / "tiny-flux")
    for path, changes in ((sample_root.spec_file(VERSION), {"repeats": 1}),
                          (sample_root.recipe_file(FLUX_RECIPE), {"epochs": 2, "sample_steps": 1})):
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **changes}, sort_keys=False))
    cli("build", VERSION)
    with patch.dict(os.environ):  # what cli.main sets for its process is put back afterwards
        assert lora_cli.main(["train", VERSION, "--recipe", FLUX_RECIPE]) == 0
        capsys.readouterr()
        assert lora_cli.main(["evaluate", VERSION, "--recipe", FLUX_RECIPE, "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert instance().get_run_by_id(evaluated["dagster_run_id"]).is_success
    rec = evaluated["recommendation"]
    assert len(evaluated["grids"]) == 2 and rec["recommended_epoch"] in (1, 2)
    assert [e["epoch"] for e in rec["epochs"]] == [1, 2] and all(math.isfinite(e["val_loss"]) for e in rec["epochs"])
    files = sorted(sample_root.loras(VERSION, FLUX_RECIPE).glob("*.safetensors"))
    assert len(files) == 2
    chain = json.loads(cli("provenance", str(files[-1]), "--json").stdout)
    assert chain["status"] == "ok" and chain["lora"]["training"]["ss_base_model_version"] == "flux1"
    assert chain["base_model"]["status"] == "unchanged" and len(chain["images"]) > 0
