"""Sensors: new batches, new specs and recipes register partitions and start builds.

A sensor never stops at one bad file: a spec or recipe that fails to load, or a folder or file whose
name is not a valid name, is skipped with a warning in the sensor's log (each tick, until it is fixed
or removed) while everything else is still registered and built.
"""

from collections.abc import Callable

import dagster as dg

from lora_pipeline.core.datasets.snapshot.autorebuild import write_auto_rebuild_specs
from lora_pipeline.core.datasets.sources.retired import retired_batches
from lora_pipeline.core.datasets.spec import load_spec
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import SEAL, DataRoot
from lora_pipeline.core.training.recipe import load_recipe
from lora_pipeline.defs.jobs import build_dataset_job, register_batch_job
from lora_pipeline.defs.partitions import dataset_versions, recipes, source_batches, unknown_keys
from lora_pipeline.defs.resources import DataRootResource


def _warn_misnamed(context: dg.SensorEvaluationContext, root: DataRoot) -> None:
    for path in root.misnamed_entries():
        context.log.warning(f"skipped {path!s}: its name is not a valid name (see core/names.py)")


@dg.sensor(jobs=[register_batch_job, build_dataset_job], minimum_interval_seconds=30,
           default_status=dg.DefaultSensorStatus.RUNNING)
def source_batch_sensor(context: dg.SensorEvaluationContext, data_root: DataRootResource) -> dg.SensorResult:
    """A new `sources/<batch>/_READY` registers and fingerprints the batch (a retired batch is skipped).

    Auto-rebuild specs whose glob source matches it get a new version spec, registered and
    built in the same tick (the spec sensor then sees the version as known).
    """
    root = data_root.data
    _warn_misnamed(context, root)
    retired = retired_batches(root)  # taken out of future versions: neither registered nor rebuilt from
    new_batches = unknown_keys(context.instance, source_batches, [b for b in root.ready_batches() if b not in retired])
    if not new_batches:
        return dg.SensorResult(skip_reason=dg.SkipReason("no new ready batch"))
    tick = write_auto_rebuild_specs(root, new_batches)
    for error in tick.unreadable:
        context.log.warning(f"auto-rebuild skipped a spec that does not load: {error}")
    for r in tick.written:
        context.log.info(f"batch {r.batch} landed: wrote {r.spec_path.name} (new version of {r.from_version})")
    new_versions = unknown_keys(context.instance, dataset_versions, [r.new_version for r in tick.written])
    run_requests = [
        dg.RunRequest(run_key=f"batch:{b}", partition_key=b, job_name=register_batch_job.name) for b in new_batches
    ]
    run_requests += [
        dg.RunRequest(run_key=f"dataset:{v}", partition_key=v, job_name=build_dataset_job.name) for v in new_versions
    ]
    requests = [source_batches.build_add_request(new_batches)]
    if new_versions:
        requests.append(dataset_versions.build_add_request(new_versions))
    return dg.SensorResult(run_requests=run_requests, dynamic_partitions_requests=requests)


def _loadable(
    context: dg.SensorEvaluationContext, names: list[str], load: Callable[[str], object], kind: str
) -> list[str]:
    """The names whose file loads; each one that does not is a warning in the sensor's log."""
    good = []
    for name in names:
        try:
            load(name)
        except UserError as exc:
            context.log.warning(f"{kind} not registered until it loads: {exc}")
            continue
        good.append(name)
    return good


def _sources_sealed(context: dg.SensorEvaluationContext, root: DataRoot, version: str) -> bool:
    """Whether every earlier version the spec takes is built and sealed; a version that is not waits for a later
    tick (at start-up every sample spec is new, and v2 must not be built before the v1 it copies)."""
    waiting = [s.name for s in load_spec(root.spec_file(version)).sources
               if s.dataset and not (root.dataset(s.name) / SEAL).is_file()]
    if waiting:
        context.log.info(f"{version} waits for {', '.join(waiting)} to be built and sealed")
    return not waiting


@dg.sensor(job=build_dataset_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def spec_sensor(context: dg.SensorEvaluationContext, data_root: DataRootResource) -> dg.SensorResult:
    """A new `specs/<version>.yaml` that loads registers the version and builds it; new recipes are registered."""
    root = data_root.data
    _warn_misnamed(context, root)
    new_versions = _loadable(context, unknown_keys(context.instance, dataset_versions, root.spec_versions()),
                             lambda v: load_spec(root.spec_file(v)), "spec")
    new_versions = [v for v in new_versions if _sources_sealed(context, root, v)]
    new_recipes = _loadable(context, unknown_keys(context.instance, recipes, root.recipe_names()),
                            lambda r: load_recipe(root.recipe_file(r)), "recipe")
    requests = []
    if new_versions:
        requests.append(dataset_versions.build_add_request(new_versions))
    if new_recipes:
        requests.append(recipes.build_add_request(new_recipes))
    if not requests:
        return dg.SensorResult(skip_reason=dg.SkipReason("no new spec or recipe that loads"))
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"dataset:{v}", partition_key=v, job_name=build_dataset_job.name)
                      for v in new_versions],
        dynamic_partitions_requests=requests,
    )
