"""Sensors: new batches, new specs and recipes register partitions and start builds."""


import dagster as dg

from lora_pipeline.core.datasets.autorebuild import write_auto_rebuild_specs
from lora_pipeline.defs.jobs import build_dataset_job, register_batch_job
from lora_pipeline.defs.partitions import dataset_versions, recipes, source_batches, unknown_keys
from lora_pipeline.defs.resources import DataRootResource


@dg.sensor(job=register_batch_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def source_batch_sensor(context: dg.SensorEvaluationContext, data_root: DataRootResource) -> dg.SensorResult:
    """A new `sources/<batch>/_READY` registers and fingerprints the batch.

    Auto-rebuild specs whose glob source matches it get a new version spec, registered and
    built in the same tick (the spec sensor then sees the version as known).
    """
    root = data_root.data
    new_batches = unknown_keys(context.instance, source_batches, root.ready_batches())
    if not new_batches:
        return dg.SensorResult(skip_reason=dg.SkipReason("no new ready batch"))
    rebuilds = write_auto_rebuild_specs(root, new_batches)
    for r in rebuilds:
        context.log.info(f"batch {r.batch} landed: wrote {r.spec_path.name} (new version of {r.from_version})")
    new_versions = unknown_keys(context.instance, dataset_versions, [r.new_version for r in rebuilds])
    run_requests = [dg.RunRequest(run_key=f"batch:{b}", partition_key=b) for b in new_batches]
    run_requests += [
        dg.RunRequest(run_key=f"dataset:{v}", partition_key=v, job_name=build_dataset_job.name) for v in new_versions
    ]
    requests = [source_batches.build_add_request(new_batches)]
    if new_versions:
        requests.append(dataset_versions.build_add_request(new_versions))
    return dg.SensorResult(run_requests=run_requests, dynamic_partitions_requests=requests)


@dg.sensor(job=build_dataset_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def spec_sensor(context: dg.SensorEvaluationContext, data_root: DataRootResource) -> dg.SensorResult:
    """A new `specs/<version>.yaml` registers the version and builds it; new recipes are registered."""
    root = data_root.data
    new_versions = unknown_keys(context.instance, dataset_versions, root.spec_versions())
    new_recipes = unknown_keys(context.instance, recipes, root.recipe_names())
    requests = []
    if new_versions:
        requests.append(dataset_versions.build_add_request(new_versions))
    if new_recipes:
        requests.append(recipes.build_add_request(new_recipes))
    if not requests:
        return dg.SensorResult(skip_reason=dg.SkipReason("no new spec or recipe"))
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"dataset:{v}", partition_key=v) for v in new_versions],
        dynamic_partitions_requests=requests,
    )
