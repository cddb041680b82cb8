"""`evaluate_lora`: X/Y grids, validation loss and the recommended epoch of one trained LoRA.

Reads `loras/<version>/<recipe>/<version>-<recipe>-eNNN.safetensors` and writes to `evals/<version>/<recipe>/`:
`grid_<i>.png` per sample prompt, `val_loss.png`, `recommendation.json` and `recommendation.md`; the same
files and the per-epoch losses go to an MLflow run nested under the training run. The files are written into a
hidden staging folder beside it and the whole folder renamed into place: a kill leaves no half evaluation.

The base model and its pipeline are loaded once; each evaluated epoch's file is put into the one adapter
(models/lora_batch.py: the first loaded as users load it, the later ones copied into its weights), sampled at
every eval weight in as few pipeline calls as memory allows (each image its own weight; classifier-free guidance
batched by the pipeline) and measured for validation loss at weight 1. On CPU the outputs are byte-identical
from run to run.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from lora_pipeline.core.datasets.sources.copying import fsync_dir
from lora_pipeline.core.datasets.sources.regular_files import NotRegularFile, is_regular
from lora_pipeline.core.datasets.sources.staging import remove_abandoned, staging_folder
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.evaluation.eval_tracking import log_evaluation, training_run_client
from lora_pipeline.core.evaluation.grid import write_grids
from lora_pipeline.core.evaluation.lora_batch import epoch_adapter, sample_weights
from lora_pipeline.core.evaluation.recommend import image_signals, recommend, round6
from lora_pipeline.core.evaluation.summary import render_markdown
from lora_pipeline.core.evaluation.val_loss import (
    ValidationSet,
    loss_plot,
    prepare_validation,
    training_losses,
    validation_loss,
)
from lora_pipeline.core.fileio import atomic_write_text, write_json
from lora_pipeline.core.models.loading import BaseModel, default_device, load_base_model, vae_encoding_dtype
from lora_pipeline.core.models.sampling import (
    load_pipeline,
    quiet_diffusers,
    sample,
    sampling_dtype,
    set_lora_weight,
)
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.training.inputs.data import load_training_data
from lora_pipeline.core.training.kohya.lora_file import epoch_mismatch, header_epoch, read_lora_metadata
from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline.core.training.run.tracking import dataset_tags
from lora_pipeline.core.training.step.lora_fused import fuse_lora_linears
from lora_pipeline.core.training.timing import StageTimes

VAL_LOSS_PNG = "val_loss.png"
RECOMMENDATION_JSON = "recommendation.json"
RECOMMENDATION_MD = "recommendation.md"


@dataclass
class EvaluationResult:
    version: str
    recipe: str
    out_dir: Path
    epochs: list[int]  # the evaluated epochs (grid rows, top to bottom)
    weights: list[float]  # grid columns after the weight-0 base column
    grid_paths: list[Path]  # grid_<i>.png, one per sample prompt, in prompt order
    val_loss_plot: Path
    recommendation_json: Path
    recommendation_md: Path
    loss_rows: list[dict[str, Any]]  # {epoch, train_loss, val_loss} per evaluated epoch
    recommendation: dict[str, Any]  # the content of recommendation.json
    summary_markdown: str  # the content of recommendation.md
    mlflow_run_id: str  # the evaluation's run (nested under the training run when that is known)
    seconds: float
    # Host seconds per stage: load (base model), validation_inputs (its latents and captions encoded), pipeline,
    # sampling (every grid image), adapters (epoch files put in the adapter), validation_loss, writing (grids,
    # plot, report), tracking (MLflow: the training losses read, the evaluation run logged)
    timings: dict[str, float]


def epoch_files(folder: Path, version: str, recipe: str) -> dict[int, Path]:
    """The saved epochs of a training: {epoch: file}, found by the trainer's file names and each checked against
    its own header (a renamed or swapped file is a UserError: its weights are another epoch's). A link in place of
    an epoch file is refused, never followed."""
    pattern = re.compile(re.escape(f"{version}-{recipe}-e") + r"(\d{3,})\.safetensors")
    found = {}
    if folder.is_dir():
        for path in folder.iterdir():
            if not pattern.fullmatch(path.name):
                continue
            if not is_regular(path):
                raise NotRegularFile(path, "symlink_not_followed" if path.is_symlink() else "not_a_regular_file")
            meta = read_lora_metadata(path)
            if (mismatch := epoch_mismatch(path, meta)) is not None:
                raise UserError(f"{mismatch}; rename it back or retrain", path)
            found[header_epoch(meta) or int(pattern.fullmatch(path.name)[1])] = path
    if not found:
        raise UserError(f"no trained epochs of {version}/{recipe}; train first (lora-pipeline train "
                        f"{version} --recipe {recipe})", folder)
    return dict(sorted(found.items()))


def select_epochs(epochs: Sequence[int], limit: int) -> list[int]:
    """All epochs, or `limit` of them evenly spaced and always ending on the last (20 of 20 by 5: 4, 8, .., 20)."""
    ordered = sorted(epochs)
    n = len(ordered)
    if limit <= 0 or limit >= n:
        return ordered
    return sorted({ordered[n - 1 - (j * n) // limit] for j in range(limit)})


def _check_headers(headers: Mapping[int, Mapping[str, str]], files: Mapping[int, Path], recipe: Recipe) -> str:
    """Every file must be for this recipe's base model and come from one training run; return that run's id."""
    runs = {headers[e].get("lora_pipeline.mlflow_run_id", "") for e in headers}
    for epoch, header in headers.items():
        trained_on = header.get("lora_pipeline.base_model")
        if trained_on is not None and trained_on != recipe.base_model:
            raise UserError(f"trained on base model '{trained_on}' but recipe {recipe.name} now says "
                            f"'{recipe.base_model}'; retrain", files[epoch])
        if "block_alphas" in header.get("ss_network_args", ""):  # block_alphas or conv_block_alphas
            raise UserError("a LoRA with per-block alphas: diffusers' load_lora_weights gives every module the most "
                            "common alpha (its alpha_pattern keys miss the modules), so a grid would not show it (the "
                            "samples rendered while training do)", files[epoch])
    if len(runs) > 1:
        raise UserError(f"epoch files come from {len(runs)} different training runs; retrain", files[min(files)])
    return runs.pop()


def _replace_folder(staged: Path, final: Path) -> None:
    """Put the complete `staged` folder in place of `final`: the earlier folder is first moved aside under a
    staging name (which `remove_abandoned` clears should a kill land between the two renames), so `final` is
    at every moment either the whole earlier evaluation, the whole new one, or absent; never half of one."""
    displaced = None
    if final.exists():
        displaced = final.parent / f".{final.name}.tmp-replaced-{os.getpid()}-{secrets.token_hex(4)}"
        final.rename(displaced)
    staged.rename(final)
    fsync_dir(final.parent)
    if displaced is not None:
        shutil.rmtree(displaced)


def _subtitle(version: str, recipe: Recipe, base: BaseModel) -> str:
    guidance = base.architecture.guidance_note(base.denoiser, recipe.guidance_scale)
    return (f"{version} / {recipe.name} · {recipe.base_model} · seed {recipe.sample_seed} + prompt index · "
            f"{recipe.sample_steps} steps · {guidance} · {recipe.resolution} px")


def _sample_epochs(
    pipe: DiffusionPipeline, base: BaseModel, validation: ValidationSet, recipe: Recipe, files: Mapping[int, Path],
    epochs: Sequence[int], dtype: torch.dtype, log: Callable[[str], None], times: StageTimes,
) -> tuple[np.ndarray, dict[int, np.ndarray], dict[int, float]]:
    """Base images, then per epoch (its weights put in the one adapter, lora_batch.py) the images at every weight,
    as few pipeline calls as memory allows, and the validation loss."""
    options = base.pipeline_call_options
    with times.host("sampling"):
        baseline = sample(pipe, recipe.sampling, options=options)
    images: dict[int, np.ndarray] = {}
    val: dict[int, float] = {}
    with epoch_adapter(pipe, base) as load:
        for epoch in epochs:
            with times.host("adapters"):
                adapter = load(files[epoch], epoch)
                fuse_lora_linears(base.denoiser)  # the validation loss's forwards, as training's (step/lora_fused.py)
            with times.host("sampling"):
                images[epoch] = sample_weights(pipe, base, recipe.sampling, adapter, recipe.eval_weights, options)
            with times.host("validation_loss"):
                set_lora_weight(pipe, adapter, 1.0)
                val[epoch] = validation_loss(base.denoiser, base, validation, dtype)
            log(f"epoch {epoch}: validation loss {val[epoch]:.6f}")
    return baseline, images, val


def evaluate_lora(
    root: DataRoot,
    version: str,
    recipe: Recipe,
    *,
    log: Callable[[str], None] = print,
    device: str | None = None,
) -> EvaluationResult:
    """Grids, validation loss and the recommended epoch of `version` × `recipe`; see the module docstring."""
    started = time.perf_counter()
    if not recipe.sample_prompts:
        raise UserError(f"recipe {recipe.name} has no sample_prompts; the grid needs at least one",
                        root.recipe_file(recipe.name))
    files = epoch_files(root.loras(version, recipe.name), version, recipe.name)
    headers = {epoch: read_lora_metadata(path) for epoch, path in files.items()}
    run_id = _check_headers(headers, files, recipe)
    epochs = select_epochs(list(files), recipe.eval_max_epochs)
    target = default_device(device)
    dtype = sampling_dtype(recipe.mixed_precision, target)
    times = StageTimes(target)
    data = load_training_data(root.dataset(version), recipe.buckets, recipe.validation_split)
    with times.host("load"):
        base = load_base_model(root.models, recipe.base_model, recipe.model_family, target, dtype,
                               recipe.t5xxl_max_token_length)
    with times.host("validation_inputs"), quiet_diffusers():  # the VAE encodes as the training's did
        base.vae.to(dtype=vae_encoding_dtype(recipe.mixed_precision if target.type == "cuda" else "no",
                                             recipe.no_half_vae))
        validation = prepare_validation(base, data, recipe, target, dtype)
    if not validation.held_out:
        log(f"{version}/{recipe.name}: validation_split holds no image out; validation loss uses the training images")
    log(f"evaluating {len(epochs)} of {len(files)} epochs x {len(recipe.eval_weights) + 1} weights x "
        f"{len(recipe.sample_prompts)} prompts on {target}")
    with times.host("pipeline"):
        pipe = load_pipeline(base, dtype, v_prediction=recipe.v_parameterization)
    baseline, images, val = _sample_epochs(pipe, base, validation, recipe, files, epochs,
                                           dtype, log, times)
    with times.host("tracking"):
        client = training_run_client(root.mlflow)
        train, train_note = training_losses(client, run_id, {e: headers[e] for e in epochs})
    rows = [
        {"epoch": e, "grid_row": i + 1, "train_loss": round6(train[e]), "val_loss": round6(val[e]),
         "file": files[e].name, "steps": int(headers[e].get("ss_steps", 0)),
         **image_signals(baseline, images[e], recipe.eval_weights)}
        for i, e in enumerate(epochs)
    ]
    decision = recommend(rows, recipe.eval_weights)
    chosen = decision["recommended_epoch"]
    out_dir = root.evals(version, recipe.name)
    remove_abandoned(out_dir.parent)
    with times.host("writing"), staging_folder(out_dir.parent, out_dir.name) as staged:
        grids = write_grids(staged, recipe, baseline, images, chosen, _subtitle(version, recipe, base))
        loss_plot(epochs, [r["train_loss"] for r in rows], [r["val_loss"] for r in rows], chosen,
                  staged / VAL_LOSS_PNG, f"{version}/{recipe.name}: loss per epoch", validation.held_out)
        report = {
            **decision,
            "version": version, "recipe": recipe.name, "recipe_sha256": recipe.sha256, "training_run_id": run_id,
            "recommended_file": files[chosen].relative_to(root.root).as_posix(),
            "epochs": rows, "saved_epochs": list(files), "weights": [0.0, *recipe.eval_weights],
            "prompts": list(recipe.sample_prompts), "grids": [p.name for p in grids],
            "validation": validation.describe(), "train_loss_source": train_note,
            "sampling": {
                "seed": recipe.sample_seed, "steps": recipe.sample_steps, "guidance_scale": recipe.guidance_scale,
                "resolution": recipe.resolution, "device": target.type, "dtype": str(dtype).removeprefix("torch."),
            },
        }
        markdown = render_markdown(report)
        write_json(staged / RECOMMENDATION_JSON, report)
        atomic_write_text(staged / RECOMMENDATION_MD, markdown)
        _replace_folder(staged, out_dir)
    grids, plot = [out_dir / p.name for p in grids], out_dir / VAL_LOSS_PNG
    with times.host("tracking"):
        eval_run = log_evaluation(client, run_id, f"{version}/{recipe.name}/eval", recipe, report,
                                  [*grids, plot, out_dir / RECOMMENDATION_JSON, out_dir / RECOMMENDATION_MD],
                                  root.mlflow, dataset_tags(data.snapshot_dir))
    log(f"recommended epoch {chosen}: {decision['basis']}")
    return EvaluationResult(
        version=version, recipe=recipe.name, out_dir=out_dir, epochs=epochs, weights=list(recipe.eval_weights),
        grid_paths=grids, val_loss_plot=plot, recommendation_json=out_dir / RECOMMENDATION_JSON,
        recommendation_md=out_dir / RECOMMENDATION_MD,
        loss_rows=[{k: r[k] for k in ("epoch", "train_loss", "val_loss")} for r in rows], recommendation=report,
        summary_markdown=markdown, mlflow_run_id=eval_run, seconds=time.perf_counter() - started,
        timings=times.seconds(),
    )
