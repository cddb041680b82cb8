"""The code location: everything under lora_pipeline/defs/, discovered by Dagster's defs loader."""

from pathlib import Path

import dagster as dg

from lora_pipeline.core.runtime import prepare_runtime

prepare_runtime()  # before any asset imports torch: run workers and the code server load this module first


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(project_root=Path(__file__).resolve().parent.parent)  # executor: defs/executor.py
