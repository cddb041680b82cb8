"""The Dagster layer: thin wrappers that call lora_pipeline.core and report rich metadata."""
