"""Resources: where the data root is, and how many processes a training runs in."""

import os
from pathlib import Path

import dagster as dg

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import DataRoot, default_data_root

PROCESSES_ENV = "LORA_PIPELINE_TRAIN_PROCESSES"


class DataRootResource(dg.ConfigurableResource):
    """The data root; empty means `$LORA_PIPELINE_DATA` or the repository's `./data`."""

    path: str = ""

    @property
    def data(self) -> DataRoot:
        return DataRoot(Path(self.path).resolve()) if self.path else DataRoot(default_data_root())


class TrainingLauncherResource(dg.ConfigurableResource):
    """How `lora_epochs` launches a training: `num_processes` 1 trains in the step's process; N > 1 runs it
    data-parallel (DDP) in N processes through `accelerate launch`, one per GPU (core/training/run/distributed.py).
    Default: `$LORA_PIPELINE_TRAIN_PROCESSES` or 1; set it per run in the launchpad (resources.launcher.config)."""

    num_processes: int = 0  # 0: the environment variable's value, else 1

    @property
    def processes(self) -> int:
        if self.num_processes:
            return self.num_processes
        value = os.environ.get(PROCESSES_ENV, "1")
        if not value.isdigit():
            raise UserError(f"${PROCESSES_ENV} must be a whole number of training processes, got {value!r}")
        return int(value)


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={"data_root": DataRootResource(), "launcher": TrainingLauncherResource()})
