"""Sensors evaluated as the daemon evaluates them: through the code location's definitions (so Dagster's own
checks of the run requests' jobs and partitions run) against a real temporary Dagster instance."""

from __future__ import annotations

import logging

import dagster as dg
import yaml

from lora_pipeline.core.datasets.snapshot.manifest import read_manifest
from lora_pipeline.core.fileio import read_json
from lora_pipeline.runs.instance import instance
from lora_pipeline.runs.jobs import run_job
from lora_pipeline_tests.helpers import land_batch, sensor_context, sensor_tick, tree_state

STUDY = "curated-study"
# the sample specs without dataset sources
FROM_BATCHES = ["hardware-curated-v1", "hardware-design-aesthetic-v1", "hardware-masked-reg-v1"]


def source_batch_sensor(context: dg.SensorEvaluationContext):
    return sensor_tick("source_batch_sensor", context)


def spec_sensor(context: dg.SensorEvaluationContext):
    return sensor_tick("spec_sensor", context)


def _apply(inst: dg.DagsterInstance, result) -> None:
    """Do what the daemon does with a tick's partition requests."""
    for request in result.dynamic_partitions_requests or []:
        inst.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))


class _Warnings(logging.Handler):
    """The warnings a sensor writes to its log (context.log) during one evaluation."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _watched(inst: dg.DagsterInstance, root) -> tuple[dg.SensorEvaluationContext, _Warnings]:
    context = sensor_context(inst, root)
    warnings = _Warnings()
    context.log.addHandler(warnings)
    return context, warnings


def _break_files(root) -> None:
    """A spec and a recipe that do not load, and a spec file whose name is not a name."""
    root.spec_file("broken-v1").write_text(
        "name: broken-v1\ntrigger: x\nrepeats: 1\nsources: [{batch: b}]\nmerge: 'false'\n"
    )
    root.recipe_file("broken").write_text("base_model: tiny-sd\nlearning_rate: -1\n")
    (root.specs / "not a name.yaml").write_text("name: x\n")


def test_spec_sensor_registers_versions_and_recipes(sample_root):
    inst = instance()
    result = spec_sensor(sensor_context(inst, sample_root))
    # the versions built from batches only; v2 copies v1 (and the merge copies v2): they wait for a seal
    assert {r.partition_key for r in result.run_requests} == set(FROM_BATCHES)
    _apply(inst, result)
    assert set(inst.get_dynamic_partitions("recipes")) == set(sample_root.recipe_names())
    again = spec_sensor(sensor_context(inst, sample_root))
    assert not again.run_requests  # known versions are not rebuilt every tick, v2 still waits
    run_job("build_dataset_job", "hardware-design-aesthetic-v1", inst, quiet=True)
    assert [r.partition_key for r in spec_sensor(sensor_context(inst, sample_root)).run_requests] == [
        "hardware-design-aesthetic-v2"]


def test_spec_sensor_skips_what_does_not_load_and_registers_the_rest(sample_root):
    inst = instance()
    _break_files(sample_root)
    context, warnings = _watched(inst, sample_root)
    result = spec_sensor(context)
    good_versions = set(FROM_BATCHES)
    assert {r.partition_key for r in result.run_requests} == good_versions
    _apply(inst, result)
    assert set(inst.get_dynamic_partitions("dataset_versions")) == good_versions
    assert set(inst.get_dynamic_partitions("recipes")) == set(sample_root.recipe_names()) - {"broken"}
    assert any("broken-v1.yaml: merge: expected true or false" in w for w in warnings.lines), warnings.lines
    assert any("broken.yaml: learning_rate: must be greater than 0" in w for w in warnings.lines), warnings.lines
    assert any("not a name.yaml" in w for w in warnings.lines), warnings.lines
    # fixed, the spec is registered on the next tick
    sample_root.spec_file("broken-v1").write_text("name: broken-v1\ntrigger: x\nrepeats: 1\nsources: [{batch: b}]\n")
    assert [r.partition_key for r in spec_sensor(sensor_context(inst, sample_root)).run_requests] == ["broken-v1"]


def test_new_batch_registers_and_auto_rebuild_makes_a_new_version(sample_root):
    inst = instance()
    spec = {
        "name": f"{STUDY}-v2", "intent": "every curated batch, rebuilt as batches land", "trigger": "hdaesth",
        "repeats": 2, "auto_rebuild": True, "sources": [{"batch": "curated-*"}],
        "captions": {"from": "sidecar"}, "checks": {"min_side": 512, "max_aspect": 2.5},
    }
    sample_root.spec_file(f"{STUDY}-v2").write_text(yaml.safe_dump(spec, sort_keys=False))
    # first tick: every committed batch is new; nothing to auto-rebuild while v2 is unbuilt
    first = source_batch_sensor(sensor_context(inst, sample_root))
    assert {r.partition_key for r in first.run_requests} == set(sample_root.ready_batches())
    assert not (sample_root.specs / f"{STUDY}-v3.yaml").exists()
    _apply(inst, first)
    inst.add_dynamic_partitions("dataset_versions", [f"{STUDY}-v2"])
    run_job("build_dataset_job", f"{STUDY}-v2", inst)
    v2_before = tree_state(sample_root.dataset(f"{STUDY}-v2"))

    land_batch(sample_root, "curated-2026-12", ["teal", "orange"])
    _break_files(sample_root)  # one broken spec (and recipe) must not block the new batch
    context, warnings = _watched(inst, sample_root)
    tick = source_batch_sensor(context)
    assert any("broken-v1.yaml: merge: expected true or false" in w for w in warnings.lines), warnings.lines
    keys = {(r.job_name, r.partition_key) for r in tick.run_requests}
    assert ("register_batch_job", "curated-2026-12") in keys and ("build_dataset_job", f"{STUDY}-v3") in keys
    v3_spec = yaml.safe_load(sample_root.spec_file(f"{STUDY}-v3").read_text())
    assert v3_spec["name"] == f"{STUDY}-v3" and "curated-2026-12" in v3_spec["intent"]
    _apply(inst, tick)
    outcomes = {request.job_name: run_job(request.job_name, request.partition_key, inst)
                for request in tick.run_requests}

    assert tree_state(sample_root.dataset(f"{STUDY}-v2")) == v2_before  # the old version is never touched
    assert read_json(sample_root.dataset(f"{STUDY}-v3") / "snapshot.json")["parents"] == [f"{STUDY}-v2"]
    built = outcomes["build_dataset_job"]  # the snapshot's page: what v3 changed against its parent v2
    assert "Changes from `curated-study-v2` to `curated-study-v3`: 2 added, 0 removed" in \
        built.metadata("dataset_snapshot")["changes_from_parent"]
    assert "0 captions changed" in built.metadata("caption_set")["caption_changes_from_parent"]
    batch = outcomes["register_batch_job"].metadata("source_batch")
    source = [s for s in read_json(sample_root.dataset(f"{STUDY}-v3") / "snapshot.json")["sources"]
              if s["name"] == "curated-2026-12"]
    assert len(batch["batch_fingerprint"]) == 64 and batch["batch_fingerprint"] != source[0]["fingerprint"]
    v3_sources = {r.source_batch for r in read_manifest(sample_root.dataset(f"{STUDY}-v3"))}
    assert "curated-2026-12" in v3_sources
    assert read_json(sample_root.dataset(f"{STUDY}-v3") / "snapshot.json")["captions_complete"]
    # the next tick sees nothing new and writes no v4
    assert not source_batch_sensor(sensor_context(inst, sample_root)).run_requests
    assert not (sample_root.specs / f"{STUDY}-v4.yaml").exists()
