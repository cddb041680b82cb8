"""lora-pipeline: copy-only dataset versions, LoRA training and evaluation as Dagster assets."""

__version__ = "0.1.0"
