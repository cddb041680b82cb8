"""Jobs the CLI, sensors and schedules launch; each is a named slice of the asset graph."""

import dagster as dg

from lora_pipeline.defs.partitions import dataset_versions, source_batches, training_runs

# Runs that use the accelerator: the cluster profile's run queue starts one at a time (deploy/cluster/dagster.yaml).
GPU_RUN = {"lora-pipeline/worker": "gpu"}

register_batch_job = dg.define_asset_job(
    "register_batch_job",
    selection=dg.AssetSelection.assets("source_batch"),
    partitions_def=source_batches,
    description="Fingerprint a landed source batch.",
)
build_dataset_job = dg.define_asset_job(
    "build_dataset_job",
    selection=dg.AssetSelection.assets("dataset_snapshot", "caption_set", "dataset_report"),
    partitions_def=dataset_versions,
    description="Snapshot + captions + validation report for one dataset version.",
)
def _training_job(name: str, asset: str, description: str):  # dagster exports no name for its type
    """A job of one version x recipe asset that runs on the accelerator."""
    return dg.define_asset_job(name, selection=dg.AssetSelection.assets(asset), partitions_def=training_runs,
                               description=description, tags=GPU_RUN)


train_job = _training_job("train_job", "lora_epochs", "Train every epoch of a LoRA for one dataset version x recipe.")
evaluate_job = _training_job("evaluate_job", "evaluation_grid",
                             "Epoch x weight grids, validation loss and the recommended epoch.")
