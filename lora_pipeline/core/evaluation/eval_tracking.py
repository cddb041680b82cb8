"""MLflow record of an evaluation: a run nested under the training run, with the files and per-epoch losses.

Each evaluation gets its own run named `<version>/<recipe>/eval` (parent: the training run named in the LoRA
header), so re-evaluating never mixes two metric histories; the training run gets tags pointing at the latest
evaluation and its recommended epoch. Without a known training run the evaluation run stands alone in the
pipeline's experiment, tagged so.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH

from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline.core.training.run.tracking import TrainingTracker, log_tags, open_store, param_value

PARENT_TAG = "mlflow.parentRunId"
PER_EPOCH_METRICS = ("val_loss", "train_loss", "break_ratio")


def training_run_client(mlflow_dir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=open_store(mlflow_dir))


def _training_run(client: MlflowClient, run_id: str) -> Run | None:
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return run if run.info.lifecycle_stage == "active" else None


def _params(recipe: Recipe, report: Mapping[str, Any]) -> list[Param]:
    values = {
        "eval_weights": list(recipe.eval_weights), "eval_max_epochs": recipe.eval_max_epochs,
        "sample_prompts": list(recipe.sample_prompts), "sample_steps": recipe.sample_steps,
        "sample_seed": recipe.sample_seed, "guidance_scale": recipe.guidance_scale, "resolution": recipe.resolution,
        "recipe_sha256": recipe.sha256, "evaluated_epochs": [r["epoch"] for r in report["epochs"]],
        "validation_held_out": report["validation"]["held_out"],
        "validation_images": len(report["validation"]["images"]),
    }
    return [Param(k, param_value(v)) for k, v in sorted(values.items())]


def _metrics(rows: Sequence[Mapping[str, Any]]) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(key, float(row[key]), now, int(row["epoch"]))
            for row in rows for key in PER_EPOCH_METRICS if row.get(key) is not None]


def log_evaluation(
    client: MlflowClient,
    training_run_id: str,
    name: str,
    recipe: Recipe,
    report: Mapping[str, Any],
    files: Sequence[Path],
    mlflow_dir: Path,
    lineage: Mapping[str, str],
) -> str:
    """Log the evaluation as a run (nested under the training run when it exists); return the run id. `lineage`:
    the dataset's tags (tracking.dataset_tags: version, manifest root, a tag per batch), as the training run has."""
    parent = _training_run(client, training_run_id)
    tags = {**lineage, "dataset_version": str(report["version"]), "recipe": recipe.name,
            "recommended_epoch": str(report["recommended_epoch"]), "lora_pipeline.kind": "evaluation"}
    if parent is not None:
        experiment_id = parent.info.experiment_id
        tags[PARENT_TAG] = parent.info.run_id
    else:
        experiment_id = TrainingTracker(mlflow_dir).experiment_id()
        tags["training_run"] = f"not found in this MLflow store: {training_run_id or '(none in the LoRA header)'}"
    run_id = client.create_run(experiment_id, run_name=name).info.run_id
    try:
        log_tags(client, run_id, tags)
        client.log_batch(run_id, params=_params(recipe, report))
        metrics = _metrics(report["epochs"])
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])
        for path in files:
            client.log_artifact(run_id, str(path))
        if parent is not None:
            client.log_batch(parent.info.run_id, tags=[RunTag("eval.run_id", run_id),
                                                        RunTag("eval.recommended_epoch", tags["recommended_epoch"])])
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
