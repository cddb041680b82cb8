"""A synthetic year of handoffs, written by the product's own code (issue 26; benchmarks/year_bench.py measures it).

Families `fam<NNN>` of up to 10 versions each. Each generation of each family lands `batches // versions` new
batches (`fam<NNN>-b<NNNNN>`, 2 tiny PNGs with sidecar captions and `_READY`) and gets a new version:
- every fifth family is an auto-rebuild family (`auto_rebuild: true`, a glob batch source): its next spec is the
  one `write_auto_rebuild_specs` (what `source_batch_sensor` calls) writes when its new batches land;
- the others chain: version g takes version g-1 (a dataset source) plus its new batches; every tenth family's
  versions merge the previous version of the next family too (`merge: true`);
- every twentieth version is blocked (`checks.min_side` above the images' size: dataset_report fails).

Every record is the product's: a batch is registered by the `source_batch` asset's own function, a version built
by the `dataset_snapshot`, `caption_set` and `dataset_report` asset functions (invoked directly, so the files are
the ones a run writes; `verify` checks them), each result recorded in the instance as a materialization of its
partition (a runless one: no Dagster run per partition, which is the slow part skipped). The dynamic partitions
are registered as the sensors register them. Trainings: training partitions `<version>|style-a`, then
`<version>|style-b` (style-a's `train_on` names every family, style-b's half of them: its partitions on the other
half are pairs asked for by hand, as `lora-pipeline train` or the Materialize dialog asks),
each with two tiny kohya epoch files written by `save_lora` with `build_metadata`'s header, and its MLflow run
(params, tags, losses) through `TrainingTracker`, as the trainer logs it. With `build=False` only the sources,
specs, recipes and partitions are written (the sensors' view; the test uses it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import numpy as np
import yaml
from PIL import Image

from lora_pipeline.core.datasets.snapshot.autorebuild import write_auto_rebuild_specs
from lora_pipeline.core.paths import READY_MARKER, DataRoot

FAMILY_LENGTH = 10
RECIPES = ("style-a", "style-b")
IMAGE_SIDE = 64


@dataclass
class History:
    """What was written: names, and seconds per stage."""

    batches: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    trainings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, stage: str, started: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.monotonic() - started, 2)


def land_batch(root: DataRoot, batch: str, seed: int, images: int = 2) -> None:
    """sources/<batch>/: `images` tiny PNGs (distinct colours) with trigger-first sidecar captions, `_READY` last."""
    folder = root.batch(batch)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(images):
        pixels = rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img-{i}.png")
        (folder / f"img-{i}.txt").write_text(f"trg, sample {seed % 7} view, tone {i}\n")
    (folder / READY_MARKER).write_text("")


def _spec(name: str, sources: list[dict], blocked: bool, **extra: object) -> dict:
    return {"name": name, "intent": f"synthetic year: {name}", "trigger": "trg", "repeats": 2, "sources": sources,
            "captions": {"from": "sidecar"}, "checks": {"min_side": 128 if blocked else 32,
                                                        "near_duplicates": "ignore"}, **extra}


def write_recipes(root: DataRoot, template: Path) -> None:
    """recipes/style-a.yaml and style-b.yaml: the demo recipe, training on every family (style-b on half)."""
    root.recipes.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(template.read_text())
    for name, train_on in zip(RECIPES, (["fam*"], ["fam*0", "fam*2", "fam*4", "fam*6", "fam*8"]), strict=True):
        root.recipe_file(name).write_text(yaml.safe_dump({**data, "train_on": train_on}, sort_keys=False))


def _next_spec(root: DataRoot, family: int, gen: int, batches: list[str], families: int, blocked: bool) -> str:
    """Write (or have the auto-rebuild write) the spec of the family's next version; its name."""
    name = f"fam{family:03d}-v{gen + 1}"
    if family % 5 == 0:
        if gen == 0:
            data = _spec(name, [{"batch": f"fam{family:03d}-b*"}], blocked, auto_rebuild=True)
            root.spec_file(name).write_text(yaml.safe_dump(data, sort_keys=False))
            return name
        written = [r.new_version for r in write_auto_rebuild_specs(root, batches).written
                   if r.new_version.startswith(f"fam{family:03d}-")]
        if written:
            return written[0]
        data = _spec(name, [{"batch": f"fam{family:03d}-b*"}], blocked, auto_rebuild=True,
                     rebuilt_from=f"fam{family:03d}-v{gen}")  # unbuilt parent (build=False): as the sensor would
        root.spec_file(name).write_text(yaml.safe_dump(data, sort_keys=False))
        return name
    sources: list[dict] = [{"dataset": f"fam{family:03d}-v{gen}"}] if gen else []
    merge = gen > 0 and family % 10 == 9 and families > 1
    if merge:
        sources.append({"dataset": f"fam{(family + 1) % families:03d}-v{gen}"})
    sources += [{"batch": b} for b in batches]
    data = _spec(name, sources, blocked, **({"merge": True} if merge else {}))
    root.spec_file(name).write_text(yaml.safe_dump(data, sort_keys=False))
    return name


class _NoRun:
    """What a directly invoked asset sees as `context.run` (Dagster has none then): a run without tags, as
    `build_dataset_job` launched by a sensor has (no early inspection)."""

    tags: dict[str, str] = {}  # noqa: RUF012 (read only)


def _context(inst: dg.DagsterInstance, key: str) -> dg.AssetExecutionContext:
    from dagster._core.execution.context.invocation import DirectOpExecutionContext

    DirectOpExecutionContext.dagster_run = property(lambda _self: _NoRun)  # type: ignore[assignment]
    return dg.build_asset_context(partition_key=key, instance=inst)


def _materialized(inst: dg.DagsterInstance, asset: str, key: str, result: dg.MaterializeResult) -> None:
    """Record an asset function's result in the instance as the materialization of its partition."""
    inst.report_runless_asset_event(dg.AssetMaterialization(asset, partition=key, metadata=result.metadata))


def register_batches(inst: dg.DagsterInstance, root: DataRoot, batches: list[str]) -> None:
    """What `register_batch_job` does for each batch: the partition, `source_batch`'s records."""
    from lora_pipeline.defs.datasets import source_batch
    from lora_pipeline.defs.partitions import register, source_batches
    from lora_pipeline.defs.resources import DataRootResource

    register(inst, source_batches, batches)
    data_root = DataRootResource(path=str(root.root))
    for batch in batches:
        _materialized(inst, "source_batch", batch, source_batch(_context(inst, batch), data_root=data_root))


def build_version(inst: dg.DagsterInstance, root: DataRoot, version: str) -> None:
    """What `build_dataset_job` does: snapshot, captions, report and seal, each recorded as its materialization."""
    from lora_pipeline.defs.datasets import caption_set, dataset_report, dataset_snapshot
    from lora_pipeline.defs.partitions import dataset_versions, register
    from lora_pipeline.defs.resources import DataRootResource

    register(inst, dataset_versions, [version])
    data_root = DataRootResource(path=str(root.root))
    for asset in (dataset_snapshot, caption_set, dataset_report):
        result = asset(_context(inst, version), data_root=data_root)
        _materialized(inst, asset.key.path[-1], version, result)


def build_history(root: DataRoot, inst: dg.DagsterInstance, batches: int, versions: int, trainings: int,
                  template: Path, build: bool = True) -> History:
    """Write the synthetic history (module docstring) under `root` and into `inst`."""
    from lora_pipeline.defs.partitions import (
        dataset_versions,
        recipes,
        register,
        source_batches,
        training_key,
        training_runs,
    )

    history = History()
    for folder in (root.sources, root.specs):
        folder.mkdir(parents=True, exist_ok=True)
    write_recipes(root, template)
    register(inst, recipes, list(RECIPES))
    families = max(1, versions // FAMILY_LENGTH)
    per_version = max(1, batches // max(1, versions))
    for gen in range(-(-versions // families)):
        for family in range(families):
            if len(history.versions) >= versions:
                break
            started = time.monotonic()
            new = [f"fam{family:03d}-b{gen * per_version + i:05d}" for i in range(per_version)]
            for i, batch in enumerate(new):
                land_batch(root, batch, seed=hash((family, gen, i)) & 0xFFFF, images=2 if build else 1)
            history.batches += new
            history.timed("batches", started)
            started = time.monotonic()
            if build:
                register_batches(inst, root, new)
            history.timed("register", started)
            blocked = (family * FAMILY_LENGTH + gen) % 20 == 7
            version = _next_spec(root, family, gen, new, families, blocked)
            history.versions.append(version)
            started = time.monotonic()
            if build:
                build_version(inst, root, version)
            history.timed("build", started)
    if not build:  # the sensors' view only: the partitions, in one call each
        register(inst, source_batches, history.batches)
        register(inst, dataset_versions, history.versions)
    started = time.monotonic()
    keys = [training_key(v, r) for r in RECIPES for v in history.versions][:trainings]
    register(inst, training_runs, keys)
    history.trainings = keys
    if build:
        from benchmarks.year_trainings import record_trainings

        record_trainings(inst, root, keys)
    history.timed("trainings", started)
    return history
