"""Plain-Python core of lora-pipeline. Nothing in this package imports Dagster."""
