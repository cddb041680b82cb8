"""Training in several processes (data-parallel, DDP) through `accelerate launch`.

`train_distributed` with `num_processes` 1 is `train_lora` in this process. With N > 1 it holds the output
folder's lock (output.own_output) and runs `accelerate launch --num_processes N` on this module: every process
loads the snapshot and base model, prepares each step's global batch of `train_batch_size` (x
`gradient_accumulation_steps`) images exactly as one process would (same order, captions, views, latents,
noise and timesteps) and trains on its contiguous share of the images (loop.Shard); DDP averages the
gradients, so every process takes the same optimizer step as one process would. Only the first process
writes epoch and step files, the resume state, samples, the loss curve and the MLflow run, and hands its
TrainResult back as JSON. Resume works as in one process: the first process removes stale files, then every
process reads the state it finds. One process per GPU (`cuda:<local rank>`); on a machine without CUDA (or
with `device="cpu"`) the processes run on the CPU and talk over gloo.

Refused with several processes: `fast_path` (a captured CUDA graph holds one process's step; DDP's gradient
all-reduce is not in it) and `network_train_unet_only: false` (only the U-Net is wrapped in DDP, so the text
encoders' LoRA gradients would not be averaged).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_bytes
from lora_pipeline.core.models.loading import default_device, resolve_base_model
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline.core.training.recipe_checks import fast_path_blockers
from lora_pipeline.core.training.run.result import TrainResult, environment_error, own_output
from lora_pipeline.core.training.run.tracking import TrainingTracker
from lora_pipeline.core.training.run.trainer import train_lora

RESULT_PATHS = ("out_dir", "loss_curve", "sample_strip")  # TrainResult fields that are paths (or None)
LOG_PREFIX = "[lora-ddp] "  # the first process's progress lines, passed on to the caller's `log`
ERROR_PREFIX = "[lora-ddp error] "  # a process's unexpected exception, named in the launcher's error


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(num_processes: int) -> list[str]:
    """`accelerate launch` of this module's worker in `num_processes` processes on this machine. Always through
    torchrun (`--multi_gpu`): accelerate's `--cpu` starts one process (several CPU processes are its MPI case);
    a worker asked to use the CPU then joins a gloo process group instead of NCCL."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", __name__]


def refusal(recipe: Recipe, num_processes: int, gpus: int | None) -> str | None:
    """Why `recipe` cannot train in `num_processes` processes (None if it can); `gpus`: the CUDA devices of
    this machine, None when training on the CPU."""
    if num_processes < 1:
        return f"num_processes must be at least 1, got {num_processes}"
    if num_processes == 1:
        return None
    if recipe.fast_path and (blockers := fast_path_blockers(recipe, processes=num_processes)):
        return f"fast_path: true is impossible here: {blockers[0]}; set fast_path: false or num_processes: 1"
    if not recipe.network_train_unet_only:
        return ("network_train_unet_only: false cannot train in several processes yet (only the U-Net's LoRA "
                "gradients are averaged across them); set num_processes: 1")
    if gpus is not None and num_processes > gpus:
        return f"num_processes {num_processes} needs as many GPUs, and this machine has {gpus}"
    return None


def train_distributed(
    root: DataRoot,
    version: str,
    recipe: Recipe,
    *,
    out_dir: Path,
    provenance: Mapping[str, str],
    num_processes: int = 1,
    tracker: TrainingTracker | None = None,
    log: Callable[[str], None] = print,
    device: str | None = None,
    started_at: float | None = None,
) -> TrainResult:
    """`train_lora` in `num_processes` processes (see the module docstring); with several, the first process
    tracks with a TrainingTracker of the same store, tags and experiment as `tracker`. `device`: None (CUDA
    if there is one, else the CPU) or "cpu"."""
    import torch

    cpu = default_device(device).type == "cpu"
    reason = refusal(recipe, num_processes, None if cpu else torch.cuda.device_count())
    if reason:
        raise UserError(reason, root.recipe_file(recipe.name))
    if num_processes == 1:
        return train_lora(root, version, recipe, out_dir=out_dir, provenance=provenance, tracker=tracker, log=log,
                          device=device, started_at=started_at)
    tracking = None if tracker is None else {"mlflow_dir": str(tracker.mlflow_dir), "tags": tracker.tags,
                                             "experiment": tracker.experiment}
    return _launch(root, version, recipe, out_dir=out_dir, provenance=provenance, num_processes=num_processes,
                   tracking=tracking, log=log, cpu=cpu, started_at=started_at)


@own_output
def _launch(root: DataRoot, version: str, recipe: Recipe, *, out_dir: Path, provenance: Mapping[str, str],
            num_processes: int, tracking: Mapping[str, Any] | None, log: Callable[[str], None], cpu: bool,
            started_at: float | None) -> TrainResult:
    # A tiny base model is generated here, once: inside a process group transformers' save_pretrained writes
    # weights from rank 0 only, so a model generated by another rank would lack its text encoder.
    resolve_base_model(root.models, recipe.base_model)
    with tempfile.TemporaryDirectory(prefix="lora-ddp-") as tmp:
        job = Path(tmp) / "job.json"
        result_file = Path(tmp) / "result.json"
        job.write_text(json.dumps({
            "root": str(root.root), "version": version, "recipe": recipe.resolved(), "recipe_sha256": recipe.sha256,
            "out_dir": str(out_dir), "provenance": dict(provenance), "tracking": tracking, "cpu": cpu,
            "started_at": started_at, "result": str(result_file),
        }))
        process = subprocess.Popen([*launch_command(num_processes), str(job)], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        tail: list[str] = []
        errors: list[str] = []
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            if line.startswith(LOG_PREFIX):
                log(line.removeprefix(LOG_PREFIX))
            elif line.startswith(ERROR_PREFIX):
                errors.append(line.removeprefix(ERROR_PREFIX))
            else:
                tail = [*tail[-19:], line]
        code = process.wait()
        outcome = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if "user_error" in outcome:
        raise UserError(outcome["user_error"])
    if code != 0 or "result" not in outcome:
        raise RuntimeError(f"training in {num_processes} processes failed (exit {code}): "
                           + " | ".join(errors or tail[-5:]))
    data = outcome["result"]
    return TrainResult(**{**data, **{key: Path(data[key]) for key in RESULT_PATHS if data[key] is not None}})


def _tracker(tracking: Mapping[str, Any] | None) -> TrainingTracker | None:
    if not tracking:
        return None
    return TrainingTracker(Path(tracking["mlflow_dir"]), tags=tracking["tags"], experiment=tracking["experiment"])


def _as_user_error(exc: Exception, out_dir: Path) -> UserError | None:
    """The one line a user should see for `exc` (as train_lora's caller sees it), None for a bug."""
    if isinstance(exc, UserError):
        return exc
    return environment_error(exc, out_dir) if isinstance(exc, OSError) else None


def _worker(job_file: Path) -> int:
    """One process of a launched training (run by `accelerate launch`)."""
    from accelerate import PartialState

    job = json.loads(job_file.read_text())
    state = PartialState(cpu=job["cpu"])
    main = state.is_main_process
    out_dir, result_file = Path(job["out_dir"]), Path(job["result"])
    try:
        recipe = Recipe(**job["recipe"])
        if recipe.sha256 != job["recipe_sha256"]:  # the JSON round trip kept every value
            raise RuntimeError(f"recipe {recipe.name} did not reach the training processes unchanged")
        train = train_lora.__wrapped__  # type: ignore[attr-defined]  # the launcher holds the output lock
        result = train(DataRoot(Path(job["root"])), job["version"], recipe, out_dir=out_dir,
                       provenance=job["provenance"], tracker=_tracker(job["tracking"]) if main else None,
                       log=(lambda line: print(LOG_PREFIX + line, flush=True)) if main else (lambda line: None),
                       device="cpu" if job["cpu"] else str(state.device), started_at=job["started_at"])
    except Exception as exc:
        error = _as_user_error(exc, out_dir)
        if error is None:
            print(f"{ERROR_PREFIX}process {state.process_index}: {type(exc).__name__}: {exc}", flush=True)
            raise
        if main:
            atomic_write_bytes(result_file, json.dumps({"user_error": str(error)}).encode())
        return 1
    if main:
        atomic_write_bytes(result_file, json.dumps({"result": asdict(result)}, default=str).encode())
    return 0


if __name__ == "__main__":
    sys.exit(_worker(Path(sys.argv[1])))
