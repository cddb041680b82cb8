"""Resources: where the data root is, and how many processes a training runs in."""

from pathlib import Path

import dagster as dg

from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.settings import settings


class DataRootResource(dg.ConfigurableResource):
    """The data root; empty means the settings' (`$LORA_PIPELINE_DATA` or the repository's `./data`)."""

    path: str = ""

    @property
    def data(self) -> DataRoot:
        return DataRoot(Path(self.path).resolve()) if self.path else DataRoot.from_env()


# The code location's data root resource; the automation conditions, which get no resources, read this one too.
DATA_ROOT = DataRootResource()


class TrainingLauncherResource(dg.ConfigurableResource):
    """How `lora_epochs` launches a training: `num_processes` 1 trains in the step's process; N > 1 runs it
    data-parallel (DDP) in N processes through `accelerate launch`, one per GPU (core/training/run/distributed.py).
    Default: `$LORA_PIPELINE_TRAIN_PROCESSES` or 1; set it per run in the launchpad (resources.launcher.config)."""

    num_processes: int = 0  # 0: the settings' value (the environment variable, else 1)

    @property
    def processes(self) -> int:
        return self.num_processes or settings().train_processes


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={"data_root": DATA_ROOT, "launcher": TrainingLauncherResource()})
