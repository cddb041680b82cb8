"""The code commit recorded in snapshots, LoRA headers and MLflow tags."""

from __future__ import annotations

import functools
import subprocess

from lora_pipeline.core.paths import REPO_ROOT

__version__ = "0.1.0"  # the package's version (lora_pipeline/__init__.py takes it from here)


@functools.cache
def code_version() -> str:
    """`git describe`-style commit of the checkout ("<sha>" or "<sha>-dirty").

    Outside a git checkout (an installed wheel) this is "lora-pipeline <version>", which is
    all that can honestly be said there.
    """
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"lora-pipeline {__version__}"
    return f"{sha}-dirty" if dirty else sha
