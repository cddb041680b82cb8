"""A training's output folder and what a training returns: `own_output` guards the folder (the lock and the
refusals; trainer.py and distributed.py train under it) and `TrainResult` is the answer."""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.locks import exclusive_lock, refuse_if_locked
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.training.recipe import Recipe

OUTPUT_LOCK = ".lock"
BUSY = "already being trained"
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


@dataclass
class TrainResult:
    version: str
    recipe: str
    out_dir: Path
    epochs: list[dict[str, Any]]  # {epoch, file (absolute path), steps, mean_loss, sha256} per saved epoch
    loss_history: list[float]  # per global step, step 1 first
    lr_history: list[float]  # effective learning rate per step (d * lr for DAdaptAdamW / Prodigy)
    images_per_second: float  # over the steps this call trained (0.0 when it only found a finished run)
    images_trained: int  # by this call
    resumed_from_epoch: int  # 0 for a fresh start
    steps_per_epoch: int
    total_steps: int
    mlflow_run_id: str
    loss_curve: Path
    device: str
    mixed_precision: str  # what ran: the recipe's on CUDA, "no" on CPU
    validation_images: list[str]  # snapshot paths held out of training (recipe.validation_split)
    fast_path: bool  # steps were replayed as CUDA graphs (fastpath.py; on a CPU the same code without graphs)
    step_files: list[str]  # absolute paths of the save_every_n_steps files of this run, oldest first
    sample_strip: Path | None  # the latest sample strip (sample_every_n_epochs), None without samples
    # Seconds per stage of this call: load, latent_caching, text_encoding, training_steps (without the text
    # encoding inside them), shape_warmup (the warm-up steps at each new batch shape, part of training_steps;
    # with the fast path, the eager step and the capture), warmup_ahead (the fast path's shapes all warmed up and
    # captured before the first epoch instead: run/warmup.py; not part of training_steps), saving (on the
    # training thread: snapshots, and the wait for the last writes), saving_background (the background writer's
    # own time: files, resume state, MLflow; run/writer.py), sampling; the host work around them (data: reading
    # the snapshot; base_model_hash: what is left of it after the load it overlaps; network: the LoRA put on the
    # model; optimizer: optimizer, schedule and accelerate; tracking: MLflow calls on the training thread;
    # loss_curve: its PNG); the background writer's jobs (writer_epoch_file, writer_resume_state, writer_mlflow);
    # and time_to_first_step, from the call's start to the end of its first training step.
    timings: dict[str, float]
    # VAE encodes and latent disk-cache hits, misses and rejected entries of this call (latent_cache.py).
    latent_cache: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. flip_aug over captions that mention text
    # The GPU's peak memory (torch.cuda.max_memory_allocated, GiB) up to training ("caching": loading, the latent
    # and text-encoder caches) and while training ("training"); empty on a CPU.
    peak_memory_gib: dict[str, float] = field(default_factory=dict)


def environment_error(exc: OSError, out_dir: Path) -> UserError | None:
    """A full disk or a read-only or forbidden folder as one line naming the file; None for any other error."""
    if exc.errno not in ENVIRONMENT_ERRNOS:
        return None
    return UserError(f"{exc.strerror} (training stopped; a rerun resumes after the last saved epoch)",
                     exc.filename or out_dir)


def own_output(train: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
    """Refuse an output folder inside sources/ or datasets/, and one another process is training into:
    two runs writing one folder would mix their epoch files (the second is refused, naming the first's pid).

    A full disk or a read-only or forbidden folder stops the training with one line naming the file; every
    write is a temp file renamed into place, so nothing half-written is left under a final name.
    """

    @functools.wraps(train)
    def locked(root: DataRoot, version: str, recipe: Recipe, *, out_dir: Path, **kwargs: Any) -> TrainResult:
        for area in (root.sources, root.datasets):
            if out_dir.resolve().is_relative_to(area.resolve()):
                raise UserError(f"refusing to write training output inside {area.name}/ (never written)", out_dir)
        try:
            with exclusive_lock(out_dir / OUTPUT_LOCK, busy=BUSY):
                return train(root, version, recipe, out_dir=out_dir, **kwargs)
        except OSError as exc:
            error = environment_error(exc, out_dir)
            if error is None:
                raise
            raise error from None

    return locked


def refuse_busy_output(out_dir: Path) -> None:
    """`own_output`'s refusal of a folder another process is training into, checked before the imports and model
    loads of a training (seconds) rather than after them."""
    refuse_if_locked(out_dir / OUTPUT_LOCK, BUSY)
