"""LoRA training on dataset snapshots (kohya-compatible files); `train_lora` is the entry point.

`train_lora` / `TrainResult` load on first use, so importing the step code (`training.loop`) does not pull
in the trainer's MLflow and matplotlib dependencies: the throughput benchmark runs on machines that have
only the training stack.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainResult", "train_lora"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lora_pipeline.core.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
