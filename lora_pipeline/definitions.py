"""The code location: everything under lora_pipeline/defs/, discovered by Dagster's defs loader."""

from pathlib import Path

import dagster as dg

from lora_pipeline.core.runtime import prepare_runtime

prepare_runtime()  # before any asset imports torch: run workers and the code server load this module first


@dg.definitions
def defs() -> dg.Definitions:
    # Every job runs its steps in the run's own process: one Python start per run instead of one per step (a run
    # started by the UI or a sensor would otherwise import torch again in each training step's process).
    return dg.Definitions.merge(
        dg.load_from_defs_folder(project_root=Path(__file__).resolve().parent.parent),
        dg.Definitions(executor=dg.in_process_executor),
    )
