"""`train_lora`: a LoRA on a dataset snapshot, one kohya-format file per saved epoch, resumable.

The base model's VAE is frozen; kohya's U-Net modules carry LoRA (network.py: attention, with `conv_dim` also
the ResNet and sampler convolutions; DoRA with `use_dora`) and, with `network_train_unet_only: false`, the text
encoders too (their outputs are then not cached). A run stops after `epochs` or at `max_train_steps`, whichever
comes first, and saves there; `save_every_n_steps` also writes step files (`-stepNNNNNNNN`), and
`sample_every_n_epochs` renders sample strips (samples.py). On CUDA the run uses the recipe's mixed precision
through accelerate (frozen weights in that dtype, LoRA weights float32), SDPA attention
(diffusers' default) and, when the recipe asks, gradient checkpointing. On CPU it runs in float32 with
deterministic algorithms, so the same inputs give byte-identical files; see seeds.py and checkpoint.py for
reproducibility and resume. Launched in several processes (distributed.py) every process trains its share
of each batch (loop.Shard) and only the first one writes files, samples and the MLflow run.

With `from_lora` the adapters start from an existing LoRA's weights (run/start_lora.py).

This module reads the inputs and the resume point and opens the MLflow run; setup.py builds the step context,
epochs.py runs the epochs, saving.py writes the files.

`provenance` may name `code_commit` (default: this checkout's) and `mlflow_run_id` (without a tracker);
the keys the trainer derives itself (dataset_version, manifest_root, spec_sha256, recipe_sha256,
base_model_source, base_model_hash) may be passed too and must then agree with what it reads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path

import torch
from accelerate import PartialState

from lora_pipeline.core.codeversion import code_version
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.models.loading import default_device, load_base_model
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.training.inputs.data import load_training_data
from lora_pipeline.core.training.kohya.lora_file import LoraProvenance
from lora_pipeline.core.training.progress import training_threads
from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline.core.training.run.checkpoint import resume_point, state_path
from lora_pipeline.core.training.run.epochs import train_steps
from lora_pipeline.core.training.run.result import TrainResult, own_output
from lora_pipeline.core.training.run.setup import DTYPES, PENDING_HASH, BaseModelHash, TrainingRun
from lora_pipeline.core.training.run.start_lora import resolve_start
from lora_pipeline.core.training.run.tracking import TrainingTracker, dataset_tags
from lora_pipeline.core.training.timing import StageTimes

DERIVED = ("dataset_version", "manifest_root", "spec_sha256", "recipe_sha256", "base_model_source", "base_model_hash")
PROVENANCE_KEYS = {*DERIVED, "code_commit", "mlflow_run_id"}


def _provenance(given: Mapping[str, str], derived: dict[str, str], run_id: str) -> LoraProvenance:
    unknown = sorted(set(given) - PROVENANCE_KEYS)
    if unknown:
        raise ValueError(f"unknown provenance keys: {', '.join(unknown)}")
    for key, value in given.items():
        if key in derived and value != derived[key]:
            raise ValueError(f"provenance {key}={value!r} disagrees with the trainer's {derived[key]!r}")
    if given.get("mlflow_run_id") and run_id and given["mlflow_run_id"] != run_id:
        raise ValueError(f"provenance mlflow_run_id={given['mlflow_run_id']!r} but the tracker's run is {run_id!r}")
    names = {f.name for f in fields(LoraProvenance)}
    values = {**{k: v for k, v in derived.items() if k in names}, "code_commit": given.get("code_commit") or
              code_version(), "mlflow_run_id": run_id or given.get("mlflow_run_id", "")}
    return LoraProvenance(**values)


@own_output
def train_lora(
    root: DataRoot,
    version: str,
    recipe: Recipe,
    *,
    out_dir: Path,
    provenance: Mapping[str, str],
    tracker: TrainingTracker | None = None,
    log: Callable[[str], None] = print,
    device: str | None = None,
    started_at: float | None = None,
    clock: Callable[[], float] = time.time,
) -> TrainResult:
    """Train (or resume) a LoRA of `recipe` on dataset `version`; see the module docstring.

    `started_at` (unix time, default now) goes into every header as kohya's ss_training_started_at; a
    resumed run keeps the one of the run it continues. `clock` gives the unix time a file is saved at
    (ss_training_finished_at); a fixed one makes runs byte-reproducible.
    """
    called_at = time.perf_counter()
    target = default_device(device)
    times = StageTimes(target)
    with times.host("data"):  # the snapshot's manifest, captions and image sizes
        data = load_training_data(root.dataset(version), recipe.buckets, recipe.validation_split)
    if recipe.masked_loss and not data.has_masks:
        raise UserError(f"masked_loss: true but dataset '{version}' has no masks (a spec source's masks: file "
                        "or alpha)", root.recipe_file(recipe.name))
    if data.has_masks and not recipe.masked_loss:
        log(f"dataset {version} has loss masks; masked_loss is off, so they are not used")
    start = resolve_start(root, recipe)  # from_lora: its file, family checked before the model loads
    precision = recipe.mixed_precision if target.type == "cuda" else "no"
    with times.host("load"):
        base = load_base_model(root.models, recipe.base_model, recipe.model_family, "cpu", DTYPES[precision],
                               recipe.t5xxl_max_token_length)
    model_hash = BaseModelHash(base.source, root.cache, times)
    # A resume state's key and a caller's hash are checked now; else the hash is read while the first epoch
    # trains (TrainingRun.settled), not before: beside the model's load it slowed the load as much as it hid
    checked_now = state_path(out_dir).is_file() or "base_model_hash" in provenance
    derived = {
        "dataset_version": version, "manifest_root": data.manifest_root, "spec_sha256": data.spec_sha256,
        "recipe_sha256": recipe.sha256, "base_model_source": base.source,
        "base_model_hash": model_hash.value() if checked_now else PENDING_HASH,
    }
    key = {k: derived[k] for k in ("recipe_sha256", "manifest_root", "base_model_hash")}
    if start is not None:  # a changed starting file starts the run over
        key["from_lora_sha256"] = start.sha256
    with PartialState().main_process_first():  # in several processes the first one removes stale files
        state = resume_point(out_dir, version, recipe.name, key, log)
    run = TrainingRun(root, version, recipe, out_dir, data, base, derived, key, state,
               state.started_at if state else started_at if started_at is not None else time.time(),
               target, precision, log, times, called_at, start, clock, model_hash)
    if tracker is None:
        return _train(run, _provenance(provenance, derived, ""), None)
    tags = {**dataset_tags(data.snapshot_dir), "dataset_version": version, "recipe": recipe.name,
            "manifest_root": data.manifest_root, "recipe_sha256": recipe.sha256}  # + a tag per batch (tracking)
    resume_id = state.provenance.get("mlflow_run_id") if state else None
    params = {**recipe.resolved(), "effective_batch_size": recipe.effective_batch_size,
              **({"flip_aug": True} if run.flip_aug else {})}  # the spec's flip_aug counts too
    opening = time.perf_counter()
    with tracker.run(f"{version}/{recipe.name}", params=params, tags=tags, resume_run_id=resume_id) as rid:
        held_out = {i.rel for i in data.validation}
        rows = [{**row.to_json_dict(), "split": "validation" if row.path in held_out else "train"}
                for row in data.image_rows]
        tracker.log_dataset(rows, name=version, digest=data.manifest_root, source=str(data.snapshot_dir))
        times.add("tracking", time.perf_counter() - opening)
        return _train(run, _provenance(provenance, derived, rid), tracker)


def _train(run: TrainingRun, provenance: LoraProvenance, tracker: TrainingTracker | None) -> TrainResult:
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(run.device.type == "cpu" or deterministic)
    threads = torch.get_num_threads()
    wanted = training_threads() if run.device.type == "cpu" else None
    if wanted is not None:
        torch.set_num_threads(wanted)
        run.log(f"CPU training on {wanted} thread(s) (1-minute load {os.getloadavg()[0]:.1f})")
    try:
        return train_steps(run, provenance, tracker)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
