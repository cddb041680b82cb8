"""The trainings of the synthetic year (benchmarks/year_history.py): per training partition `<version>|<recipe>`,
two tiny kohya epoch files and the MLflow run, written by the product's own writers without training, and the
partition's `lora_epochs` and `evaluation_grid` materializations (runless, with the assets' main metadata keys:
the path, the epochs table, the MLflow run, the recommended epoch; no grid images, since nothing is sampled), so
the automation sees a trained and evaluated history, as a year of the product leaves it, and not 2,000 partitions
that were never trained.

The MLflow run is `TrainingTracker.run` with the trainer's name, params and tags, a few `loss`/`lr` steps and
the dataset input, as `train_lora` logs them; each epoch file is `save_lora` of a one-module LoRA (zeros) with
`build_metadata`'s header (kohya ss_* keys and the `lora_pipeline.*` provenance). The base model is named, not
hashed (no model folder in the synthetic root): `provenance` reads these files but reports the base model as
not found.
"""

from __future__ import annotations

import time

import dagster as dg
import torch

from lora_pipeline.core.codeversion import code_version
from lora_pipeline.core.datasets.snapshot.manifest import read_manifest, read_snapshot_info
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.training.kohya.lora_file import LoraProvenance, build_metadata, save_lora
from lora_pipeline.core.training.recipe import load_recipe
from lora_pipeline.core.training.run.checkpoint import epoch_file_name
from lora_pipeline.core.training.run.tracking import TrainingTracker, dataset_tags
from lora_pipeline.defs.partitions import split_training_key

EPOCHS = 2
MODULE = "lora_unet_down_blocks_0_attentions_0_proj_in"


def _tensors() -> dict[str, torch.Tensor]:
    return {f"{MODULE}.lora_down.weight": torch.zeros(4, 8), f"{MODULE}.lora_up.weight": torch.zeros(8, 4),
            f"{MODULE}.alpha": torch.tensor(2.0)}


def record_training(root: DataRoot, tracker: TrainingTracker, key: str) -> tuple[str, list[dict]]:
    """The epoch files and MLflow run of one training partition; its MLflow run id and the epochs' records."""
    version, recipe_name = split_training_key(key)
    recipe = load_recipe(root.recipe_file(recipe_name))
    snapshot = root.dataset(version)
    info = read_snapshot_info(snapshot)
    images = [r for r in read_manifest(snapshot) if r.kind == "image"]
    tags = {**dataset_tags(snapshot), "dataset_version": version, "recipe": recipe.name,
            "manifest_root": info.manifest_root, "recipe_sha256": recipe.sha256}
    params = {**recipe.resolved(), "effective_batch_size": recipe.effective_batch_size}
    started = time.time()
    with tracker.run(f"{version}/{recipe.name}", params=params, tags=tags) as run_id:
        tracker.log_steps([0.2, 0.18, 0.17, 0.15], [1.0] * 4)
        provenance = LoraProvenance(version, info.manifest_root, info.spec_sha256, recipe.base_model,
                                    "0" * 64, code_version(), run_id)
        out = root.loras(version, recipe.name)
        out.mkdir(parents=True, exist_ok=True)
        folder = f"{2}_trg"
        epochs = []
        for epoch in range(1, EPOCHS + 1):
            metadata = build_metadata(
                recipe=recipe, provenance=provenance, epoch=epoch, steps=2 * epoch, max_train_steps=2 * EPOCHS,
                num_train_images=2 * len(images), num_batches_per_epoch=2,
                tag_frequency={folder: {"trg": len(images)}},
                dataset_dirs={folder: {"n_repeats": 2, "img_count": len(images)}}, training_started_at=started)
            name = epoch_file_name(version, recipe.name, epoch)
            sha = save_lora(out / name, _tensors(), metadata)
            epochs.append({"epoch": epoch, "file": name, "steps": 2 * epoch, "mean_loss": 0.17, "sha256": sha})
    return run_id, epochs


def _materialized(inst: dg.DagsterInstance, root: DataRoot, key: str, run_id: str, epochs: list[dict]) -> None:
    """The partition's lora_epochs and evaluation_grid materializations, as the assets record them (main keys)."""
    from lora_pipeline.defs.metadata import table

    version, recipe = split_training_key(key)
    out = root.loras(version, recipe)
    inst.report_runless_asset_event(dg.AssetMaterialization(
        "lora_epochs", partition=key, tags={"dagster/data_version": epochs[-1]["sha256"]},
        metadata={"path": dg.MetadataValue.path(str(out)), "mlflow_run_id": run_id, "epoch_files": len(epochs),
                  "epochs": table(epochs, ["epoch", "file", "steps", "mean_loss", "sha256"]),
                  "final_mean_loss": epochs[-1]["mean_loss"], "synthetic": "year_bench: no training ran"}))
    inst.report_runless_asset_event(dg.AssetMaterialization(
        "evaluation_grid", partition=key,
        metadata={"path": dg.MetadataValue.path(str(root.evals(version, recipe))),
                  "recommended_epoch": epochs[-1]["epoch"],
                  "recommended_file": dg.MetadataValue.path(str(out / epochs[-1]["file"])),
                  "mlflow_run_id": run_id, "synthetic": "year_bench: nothing sampled"}))


def record_trainings(inst: dg.DagsterInstance, root: DataRoot, keys: list[str]) -> None:
    """Each training partition's files, MLflow run and materializations."""
    tracker = TrainingTracker(root.mlflow, tags={"synthetic": "year_bench"})
    for key in keys:
        run_id, epochs = record_training(root, tracker, key)
        _materialized(inst, root, key, run_id, epochs)
