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
train_job = dg.define_asset_job(
    "train_job",
    selection=dg.AssetSelection.assets("lora_epochs"),
    partitions_def=training_runs,
    description="Train every epoch of a LoRA for one dataset version x recipe.",
    tags=GPU_RUN,
)
evaluate_job = dg.define_asset_job(
    "evaluate_job",
    selection=dg.AssetSelection.assets("evaluation_grid"),
    partitions_def=training_runs,
    description="Epoch x weight grids, validation loss and the recommended epoch.",
    tags=GPU_RUN,
)
