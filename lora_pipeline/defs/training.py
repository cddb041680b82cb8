"""Training assets: lora_epochs -> evaluation_grid, per dataset version x recipe, in pool `gpu`."""

import functools
import time

import dagster as dg

from lora_pipeline.core.codeversion import code_version
from lora_pipeline.core.datasets.checks.gate import require_passed_report
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.lineage.batch_links import version_batches
from lora_pipeline.core.lineage.lineage_index import update_index
from lora_pipeline.core.paths import MANIFEST, DataRoot, external_mlflow_uri, mlflow_tracking_uri
from lora_pipeline.core.training.recipe import Recipe, load_recipe
from lora_pipeline.core.training.run.result import refuse_busy_output
from lora_pipeline.defs.automation import evaluate_on_condition, train_on_condition
from lora_pipeline.defs.failures import fails_on_user_error
from lora_pipeline.defs.lineage_pages import batch_observations, blocked_observation
from lora_pipeline.defs.metadata import image_markdown, provenance_metadata, table
from lora_pipeline.defs.partitions import NO_PARTITION_LINKS, split_training_key, training_runs
from lora_pipeline.defs.placement import GPU, op_tags
from lora_pipeline.defs.resources import DataRootResource, TrainingLauncherResource
from lora_pipeline.defs.run_health import fail_dead_runs

GROUP = "training"
# Every asset of a version x recipe: partitioned so, in this group, on a `gpu` worker, one at a time (pool `gpu`).
training_asset = functools.partial(dg.asset, partitions_def=training_runs, group_name=GROUP,
                                   kinds={"pytorch", "mlflow"}, op_tags=op_tags(GPU), pool="gpu")
MLFLOW_UI = "http://127.0.0.1:5000"  # `make mlflow-ui`


def _training_inputs(
    context: dg.AssetExecutionContext, data_root: DataRootResource
) -> tuple[DataRoot, str, Recipe]:
    """The data root, dataset version and recipe of the partition `<version>|<recipe>`."""
    root = data_root.data
    version, recipe_name = split_training_key(context.partition_key)
    return root, version, load_recipe(root.recipe_file(recipe_name))


def _mlflow_link(run_id: str) -> dg.MetadataValue:
    """A link to the run's page in the MLflow UI (its direct run route) where the UI's address is known: the
    tracking server's own over http(s), or `make mlflow-ui`'s for the local store; else the run id as text."""
    uri = external_mlflow_uri()
    ui = MLFLOW_UI if uri is None else uri.rstrip("/") if uri.startswith(("http://", "https://")) else None
    return dg.MetadataValue.url(f"{ui}/#/runs/{run_id}") if ui else dg.MetadataValue.text(run_id)


@training_asset(
    deps=[dg.AssetDep("dataset_report", partition_mapping=NO_PARTITION_LINKS)],  # its version: the key's first half
    automation_condition=train_on_condition,
    description="`loras/<version>/<recipe>/<version>-<recipe>-eNNN.safetensors`: one kohya-format LoRA per "
    "saved epoch, logged to MLflow. Refuses a dataset whose latest blocking checks failed.",
)
@fails_on_user_error
def lora_epochs(context: dg.AssetExecutionContext, data_root: DataRootResource,
                launcher: TrainingLauncherResource) -> dg.MaterializeResult:
    # A killed earlier run would still hold a `gpu` slot and stay STARTED: fail it and free the slot (a
    # run started from the UI or a sensor reaches this point when the pool had a slot left).
    started = time.perf_counter()
    fail_dead_runs(context.instance, context.log.warning)
    root, version, recipe = _training_inputs(context, data_root)
    # Dagster's blocking checks only stop steps inside one run; a separate run must check for itself.
    try:
        require_passed_report(root, version)
    except UserError as exc:  # the partition's page says it is blocked, why, and links the report
        context.log_event(blocked_observation(root, version, recipe.name, str(exc)))
        raise
    refuse_busy_output(root.loras(version, recipe.name))  # before the imports below, not after them
    # torch/diffusers/mlflow take seconds to import: only runs that train pay for them, not every code load.
    from lora_pipeline.core.training.run.distributed import train_distributed
    from lora_pipeline.core.training.run.tracking import TrainingTracker

    commit = code_version()
    tracker = TrainingTracker(
        root.mlflow, log=context.log.warning,
        tags={"dagster_run_id": context.run_id, "dagster_partition_key": str(context.partition_key),
              "code_commit": commit},
    )
    processes = launcher.processes
    asset_seconds = {"asset_setup": time.perf_counter() - started}  # the gate, the imports, MLflow's store
    result = train_distributed(
        root, version, recipe, out_dir=root.loras(version, recipe.name), provenance={"code_commit": commit},
        num_processes=processes, tracker=tracker, log=context.log.info,
    )
    last = result.epochs[-1]
    finishing = time.perf_counter()
    update_index(root, version, recipe.name)  # the lineage index learns the epoch files
    samples = {}
    if result.sample_strip is not None:  # sample_every_n_epochs: the latest strip, to stop a bad run early
        samples["latest_samples"] = image_markdown(result.sample_strip, f"samples: {result.sample_strip.stem}")
    from lora_pipeline.core.lineage.provenance import trace_lora

    chain = trace_lora(root, result.out_dir / last["file"])  # checks every link, as `lora-pipeline provenance`
    for observation in batch_observations(root, list(version_batches(root, version))):  # now with this LoRA
        context.log_event(observation)
    asset_seconds["provenance_and_lineage"] = time.perf_counter() - finishing
    return dg.MaterializeResult(
        data_version=dg.DataVersion(last["sha256"]),
        metadata={
            "path": dg.MetadataValue.path(str(result.out_dir)),
            **provenance_metadata(chain, root.dataset(version) / MANIFEST),  # first: where it all came from
            "code_commit": commit,
            "mlflow_run": _mlflow_link(result.mlflow_run_id),
            "epochs": table(result.epochs, ["epoch", "file", "steps", "mean_loss", "sha256"]),
            "epoch_files": len(result.epochs),
            "loss_curve": image_markdown(result.loss_curve, "training loss"),
            **samples,
            "effective_batch_size": recipe.effective_batch_size,
            "step_files": len(result.step_files),
            "final_mean_loss": float(last["mean_loss"]),
            "images_per_second": float(result.images_per_second),
            "images_trained": result.images_trained,
            "fast_path": result.fast_path,
            **{f"latent_cache_{name}": value for name, value in result.latent_cache.items()},
            "warnings": dg.MetadataValue.md("\n".join(f"- {w}" for w in result.warnings) or "none"),
            **{f"seconds_{name}": round(value, 2) for name, value in {**result.timings, **asset_seconds}.items()},
            "resumed_from_epoch": result.resumed_from_epoch,
            "total_steps": result.total_steps,
            "device": result.device,
            "training_processes": processes,
            "mixed_precision": result.mixed_precision,
            "mlflow_run_id": result.mlflow_run_id,
            "mlflow_tracking_uri": mlflow_tracking_uri(root.mlflow),
        },
    )


@training_asset(
    deps=[lora_epochs],
    automation_condition=evaluate_on_condition,
    description="`evals/<version>/<recipe>/`: epoch x LoRA-weight grids (one per prompt), validation loss and the "
    "recommended sweet-spot epoch with its reasons.",
)
@fails_on_user_error
def evaluation_grid(context: dg.AssetExecutionContext, data_root: DataRootResource) -> dg.MaterializeResult:
    root, version, recipe = _training_inputs(context, data_root)
    from lora_pipeline.core.evaluation.evaluate import evaluate_lora  # heavy import, as in lora_epochs
    from lora_pipeline.core.training.run.checkpoint import epoch_file_name

    result = evaluate_lora(root, version, recipe, log=context.log.info)
    recommended = result.recommendation["recommended_epoch"]
    update_index(root, version, recipe.name)  # the lineage index learns the recommendation
    chosen = root.loras(version, recipe.name) / epoch_file_name(version, recipe.name, recommended)
    metadata: dict = {
        "path": dg.MetadataValue.path(str(result.out_dir)),
        "recommended_epoch": recommended,
        "recommended_file": dg.MetadataValue.path(str(chosen)),
        "provenance_command": dg.MetadataValue.text(f"lora-pipeline provenance {chosen}"),
        "recommendation": dg.MetadataValue.md(result.summary_markdown),
        "loss_table": table(result.loss_rows, ["epoch", "train_loss", "val_loss"]),
        "val_loss": image_markdown(result.val_loss_plot, "validation and training loss"),
        "mlflow_run": _mlflow_link(result.mlflow_run_id),
        "mlflow_run_id": result.mlflow_run_id,
        "seconds": round(result.seconds, 1),
        **{f"seconds_{name}": round(value, 2) for name, value in result.timings.items()},
    }
    for i, grid in enumerate(result.grid_paths):
        metadata[f"grid_{i}"] = image_markdown(grid, f"prompt {i}: {recipe.sample_prompts[i]}", max_width=1400)
    return dg.MaterializeResult(metadata=metadata)
