"""Resources: where the data root is."""

from pathlib import Path

import dagster as dg

from lora_pipeline.core.paths import DataRoot, default_data_root


class DataRootResource(dg.ConfigurableResource):
    """The data root; empty means `$LORA_PIPELINE_DATA` or the repository's `./data`."""

    path: str = ""

    @property
    def data(self) -> DataRoot:
        return DataRoot(Path(self.path).resolve()) if self.path else DataRoot(default_data_root())


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={"data_root": DataRootResource()})
