"""Process-wide settings made before torch, transformers, diffusers or MLflow are imported: by the command
line (cli.main) and the code location (definitions.py, so every Dagster run worker gets them too)."""

from __future__ import annotations

import logging
import os


def prepare_runtime() -> None:
    """OpenMP threads sleep instead of spinning while they wait (a busy machine then slows CPU training in
    proportion, core/training/progress.py), and third-party notices and progress bars stay off the terminal:
    transformers' note that torchvision is absent (on purpose: it breaks the CPU torch), per-shard loading and
    saving bars of a 5 MB tiny model, bitsandbytes' optional kernel package, mlflow's table creation. A value
    the user set is kept."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
