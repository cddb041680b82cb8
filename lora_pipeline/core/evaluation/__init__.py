"""Evaluation of trained LoRAs: X/Y grids, validation loss and the recommended (sweet-spot) epoch."""

from lora_pipeline.core.evaluation.evaluate import EvaluationResult, evaluate_lora

__all__ = ["EvaluationResult", "evaluate_lora"]
