"""lora-pipeline: copy-only dataset versions, LoRA training and evaluation as Dagster assets."""

from lora_pipeline.core.codeversion import __version__

__all__ = ["__version__"]
