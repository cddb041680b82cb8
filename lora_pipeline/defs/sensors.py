"""Sensors: new batches, new specs and recipes register partitions and start builds.

A sensor never stops at one bad file: a spec or recipe that fails to load, or a folder or file whose
name is not a valid name, is skipped with a warning in the sensor's log (each tick, until it is fixed
or removed) while everything else is still registered and built.
"""

import json
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from lora_pipeline.core.datasets.snapshot.autorebuild import write_auto_rebuild_specs
from lora_pipeline.core.datasets.sources.arrival import ArrivalLook, look_at_arrivals
from lora_pipeline.core.datasets.sources.retired import retirement
from lora_pipeline.core.datasets.sources.watch import Watch, folder_name, watch_folder, yaml_name
from lora_pipeline.core.datasets.spec import load_spec
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.names import is_name
from lora_pipeline.core.paths import SEAL, DataRoot
from lora_pipeline.core.settings import settings
from lora_pipeline.core.training.recipe import load_recipe
from lora_pipeline.defs.jobs import build_dataset_job, register_batch_job
from lora_pipeline.defs.partitions import (
    asked_by_train_on,
    dataset_versions,
    recipes,
    source_batches,
    training_runs,
    unknown_keys_of,
)
from lora_pipeline.defs.resources import DataRootResource


def _misnamed(context: dg.SensorEvaluationContext, path: Path) -> None:
    context.log.warning(f"skipped {path!s}: its name is not a valid name (see core/names.py)")


def _now_ns() -> int:
    return time.time_ns()


def _cursor(context: dg.SensorEvaluationContext) -> dict:
    try:
        data = json.loads(context.cursor or "{}")
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _watch(context: dg.SensorEvaluationContext, folder: Path, state: object,
           partitions: dg.DynamicPartitionsDefinition, name_of: Callable[[str], str | None]) -> Watch:
    """The folder's entries to look at this tick (core/datasets/sources/watch.py): the pending ones, and when the
    folder changed, the new ones not registered yet."""
    return watch_folder(folder, state, _now_ns(), lambda names: unknown_keys_of(context.instance, partitions, names),
                        name_of)


def _ready_candidates(context: dg.SensorEvaluationContext, root: DataRoot, watch: Watch) -> list[str]:
    """Of the watched entries of `sources/`, the batches that may be registered: ready, validly named, not in
    transit, not retired. The others that could still become one are kept pending."""
    ready = []
    for entry in watch.candidates:
        watch.examined.append(entry)
        path = root.sources / entry
        if not path.is_dir() or path.is_symlink():
            continue  # never a batch; replacing it with a folder moves sources/' time
        if not root.ready_folder(entry):
            watch.keep_pending(entry)
        elif not root.batch_named(entry):
            if not is_name(entry):
                _misnamed(context, path)
            watch.keep_pending(entry)  # a copy in transit is renamed (sources/ changes), a misnamed one too
        elif retirement(root, entry) is not None:  # taken out of future versions: neither registered nor used
            watch.keep_pending(entry)
        else:
            ready.append(entry)
    return ready


def _settled_batches(context: dg.SensorEvaluationContext, root: DataRoot, ready: list[str]) -> ArrivalLook:
    """Safe arrival (core/datasets/sources/arrival.py): of the ready batches not registered yet, those whose
    listing held still since an earlier tick's look, kept in the cursor."""
    settle = settings().arrival_settle_seconds
    look = look_at_arrivals(root, ready, context.cursor, time.time(), settle)
    for batch in look.waiting:
        context.log.info(f"batch {batch} waits until its files stay unchanged between two looks {settle:g} s apart")
    return look


def _looked(context: dg.SensorEvaluationContext, *watches: Watch) -> str:
    """One line of what the tick looked at: proportional to what changed, not to the history."""
    parts = [f"{w.folder.name}/: {'listed, ' if w.listed else ''}{len(w.examined)} examined, {len(w.pending)} pending"
             for w in watches]
    line = "; ".join(parts)
    context.log.debug(line)
    return line


@dg.sensor(jobs=[register_batch_job, build_dataset_job], minimum_interval_seconds=30,
           default_status=dg.DefaultSensorStatus.RUNNING)
def source_batch_sensor(context: dg.SensorEvaluationContext, data_root: DataRootResource) -> dg.SensorResult:
    """A new `sources/<batch>/_READY` registers and fingerprints the batch, once its listing held still between
    two ticks (safe arrival; the first look is kept in the cursor); a retired batch is skipped.

    Auto-rebuild specs whose glob source matches it get a new version spec, registered and
    built in the same tick (the spec sensor then sees the version as known).
    """
    root = data_root.data
    watch = _watch(context, root.sources, _cursor(context).get("sources"), source_batches, folder_name)
    arrivals = _settled_batches(context, root, _ready_candidates(context, root, watch))
    for batch in arrivals.waiting:
        watch.keep_pending(batch)
    cursor = json.dumps({**json.loads(arrivals.cursor), "sources": watch.state()}, sort_keys=True)
    new_batches = arrivals.settled
    looked = _looked(context, watch)
    if not new_batches:
        waiting = f" ({len(arrivals.waiting)} arriving)" if arrivals.waiting else ""
        return dg.SensorResult(skip_reason=dg.SkipReason(f"no new settled batch{waiting}; {looked}"), cursor=cursor)
    tick = write_auto_rebuild_specs(root, new_batches)
    for error in tick.unreadable:
        context.log.warning(f"auto-rebuild skipped a spec that does not load: {error}")
    for r in tick.written:
        context.log.info(f"batch {r.batch} landed: wrote {r.spec_path.name} (new version of {r.from_version})")
    new_versions = unknown_keys_of(context.instance, dataset_versions, [r.new_version for r in tick.written])
    run_requests = [
        dg.RunRequest(run_key=f"batch:{b}", partition_key=b, job_name=register_batch_job.name) for b in new_batches
    ]
    run_requests += [
        dg.RunRequest(run_key=f"dataset:{v}", partition_key=v, job_name=build_dataset_job.name) for v in new_versions
    ]
    requests = [source_batches.build_add_request(new_batches)]
    if new_versions:
        requests.append(dataset_versions.build_add_request(new_versions))
    trainings = asked_by_train_on(context.instance, root, new_versions, [])
    if trainings:
        requests.append(training_runs.build_add_request(trainings))
    return dg.SensorResult(run_requests=run_requests, dynamic_partitions_requests=requests, cursor=cursor)


def _loadable(context: dg.SensorEvaluationContext, watch: Watch, load: Callable[[str], object], kind: str,
              ready: Callable[[str], bool] = lambda _name: True) -> list[str]:
    """The watched names whose file loads and is `ready`; each one that does not load is a warning in the sensor's
    log. Those that do not load, are not ready or are misnamed are kept pending (fixed in place, they are taken)."""
    good = []
    for name in watch.candidates:
        watch.examined.append(name)
        path = watch.folder / f"{name}.yaml"
        if not path.is_file():
            continue
        if not is_name(name):
            _misnamed(context, path)
            watch.keep_pending(name)
            continue
        try:
            load(name)
        except UserError as exc:
            context.log.warning(f"{kind} not registered until it loads: {exc}")
            watch.keep_pending(name)
            continue
        if ready(name):
            good.append(name)
        else:
            watch.keep_pending(name)
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
    """A new `specs/<version>.yaml` that loads registers the version and builds it; new recipes are registered;
    the training partitions their recipes' `train_on` asks for are registered. Only new and pending files are
    read (the cursor: core/datasets/sources/watch.py)."""
    root = data_root.data
    before = _cursor(context)
    specs = _watch(context, root.specs, before.get("specs"), dataset_versions, yaml_name)
    new_versions = _loadable(context, specs, lambda v: load_spec(root.spec_file(v)), "spec",
                             lambda v: _sources_sealed(context, root, v))
    recipe_watch = _watch(context, root.recipes, before.get("recipes"), recipes, yaml_name)
    new_recipes = _loadable(context, recipe_watch, lambda r: load_recipe(root.recipe_file(r)), "recipe")
    cursor = json.dumps({"specs": specs.state(), "recipes": recipe_watch.state()}, sort_keys=True)
    requests = []
    if new_versions:
        requests.append(dataset_versions.build_add_request(new_versions))
    if new_recipes:
        requests.append(recipes.build_add_request(new_recipes))
    trainings = asked_by_train_on(context.instance, root, new_versions, new_recipes)
    if trainings:
        requests.append(training_runs.build_add_request(trainings))
    looked = _looked(context, specs, recipe_watch)
    if not requests:
        return dg.SensorResult(skip_reason=dg.SkipReason(f"no new spec or recipe that loads; {looked}"),
                               cursor=cursor)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"dataset:{v}", partition_key=v, job_name=build_dataset_job.name)
                      for v in new_versions],
        dynamic_partitions_requests=requests,
        cursor=cursor,
    )
