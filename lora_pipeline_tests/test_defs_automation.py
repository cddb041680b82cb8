"""Training follows the data (defs/automation.py), driven the way the daemon drives it: sensors evaluated
through the definitions, real builds, and `evaluate_automation_conditions` on a real instance."""

from __future__ import annotations

import dagster as dg
import yaml

from lora_pipeline.core.fileio import read_json
from lora_pipeline.defs.partitions import asked_by_train_on, register, training_key, training_runs
from lora_pipeline.runs.instance import definitions, instance
from lora_pipeline.runs.jobs import run_job
from lora_pipeline.runs.outcome import RunOutcome
from lora_pipeline_tests.helpers import first_look, land_batch, sensor_context, sensor_tick

FAMILY = "hardware-curated"  # the bundled auto-rebuild spec; the demo-tiny recipe has train_on: [it]
LORA_EPOCHS, EVALUATION_GRID = dg.AssetKey("lora_epochs"), dg.AssetKey("evaluation_grid")


def _tick(inst: dg.DagsterInstance, root, name: str, cursor: str | None = None) -> None:
    """One sensor tick as the daemon runs it: partitions added, then the requested runs executed."""
    data = sensor_tick(name, sensor_context(inst, root, cursor))
    for request in data.dynamic_partitions_requests or []:
        inst.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    for run in data.run_requests:
        run_job(run.job_name, run.partition_key, inst, quiet=True)


def _build(inst: dg.DagsterInstance, root, version: str) -> RunOutcome:
    """As spec_sensor does for a new spec: the version and the training partitions `train_on` asks for are
    registered, then the version is built."""
    register(inst, training_runs, asked_by_train_on(inst, root, [version], []))
    inst.add_dynamic_partitions("dataset_versions", [version])
    return run_job("build_dataset_job", version, inst, quiet=True)


def _requested(result) -> dict[str, set[str]]:
    return {key.to_user_string(): {str(p) for p in result.get_requested_partitions(key)}
            for key in (LORA_EPOCHS, EVALUATION_GRID)}


def test_a_new_batch_of_a_train_on_family_is_trained_and_a_failed_version_is_not(sample_root, monkeypatch):
    monkeypatch.setenv("LORA_PIPELINE_ARRIVAL_SETTLE_SECONDS", "0")
    inst = instance()
    defs = definitions()
    evaluate = lambda cursor: dg.evaluate_automation_conditions(defs=defs, instance=inst, cursor=cursor)  # noqa: E731

    # what the sensors do at start-up, for the one version this needs: partitions registered, v1 built
    inst.add_dynamic_partitions("source_batches", sample_root.ready_batches())
    inst.add_dynamic_partitions("recipes", sample_root.recipe_names())
    _build(inst, sample_root, f"{FAMILY}-v1")
    first = evaluate(None)
    # versions and recipes that existed before the automation first looked are not trained behind anyone's back
    assert _requested(first) == {"lora_epochs": set(), "evaluation_grid": set()}

    land_batch(sample_root, "curated-2026-12", ["teal", "teal"])  # captions in the vocabulary; marker last
    # a first look, then the tick that registers it, writes and builds hardware-curated-v2
    _tick(inst, sample_root, "source_batch_sensor", first_look(inst, sample_root))
    assert sample_root.spec_file(f"{FAMILY}-v2").is_file()
    after_batch = evaluate(first.cursor)
    v2 = training_key(f"{FAMILY}-v2", "demo-tiny")
    # training partitions exist only for the pairs train_on asks for: not every version x every recipe
    assert set(inst.get_dynamic_partitions("training_runs")) == {training_key(f"{FAMILY}-v1", "demo-tiny"), v2}
    # only the recipe whose train_on names the family, only the new version; epochs and grid in one run
    assert _requested(after_batch) == {"lora_epochs": {v2}, "evaluation_grid": {v2}}
    again = evaluate(after_batch.cursor)
    assert _requested(again) == {"lora_epochs": set(), "evaluation_grid": set()}  # requested once, not every tick

    # epochs trained again outside the automation (a runless event stands in for a `train` run): new grid
    inst.report_runless_asset_event(dg.AssetMaterialization(LORA_EPOCHS, partition=v2))
    after_epochs = evaluate(again.cursor)
    assert _requested(after_epochs) == {"lora_epochs": set(), "evaluation_grid": {v2}}

    # a new version of the family whose blocking checks fail: built, and nothing is requested
    spec = yaml.safe_load(sample_root.spec_file(f"{FAMILY}-v2").read_text())
    spec.update(name=f"{FAMILY}-v3", auto_rebuild=False, checks={**spec["checks"], "min_side": 1024})
    sample_root.spec_file(f"{FAMILY}-v3").write_text(yaml.safe_dump(spec, sort_keys=False))
    built = _build(inst, sample_root, f"{FAMILY}-v3")
    assert read_json(sample_root.dataset(f"{FAMILY}-v3") / "report.json")["passed"] is False
    after_failure = evaluate(after_epochs.cursor)
    assert _requested(after_failure) == {"lora_epochs": set(), "evaluation_grid": set()}
    # the reason, as the asset's Automation tab shows it: v3 reached the gate condition and it was false there
    v3 = training_key(f"{FAMILY}-v3", "demo-tiny")
    gate = _node(after_failure, LORA_EPOCHS, "dataset_report_blocking_checks_passed")
    with dg.partition_loading_context(dynamic_partitions_store=inst):  # training partitions are dynamic
        assert v3 in _keys(gate.serializable_evaluation.candidate_subset) and not gate.true_subset.size
    # ... and v3's training page says it is blocked and links the report; the failed check names v3
    (blocked,) = inst.fetch_observations(dg.AssetRecordsFilter(LORA_EPOCHS, asset_partitions=[v3]), limit=5).records
    text = blocked.asset_observation.metadata["blocked"].value
    assert "Blocked" in text and f"/assets/dataset_report?view=partitions&partition={FAMILY}-v3" in text
    (check,) = [e.asset_check_evaluation_data for e in built.events
                if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
                and e.asset_check_evaluation_data.check_name == "no_blocking_problems"]
    assert not check.passed and check.partition == f"{FAMILY}-v3" and check.description.startswith(f"{FAMILY}-v3:")
    assert check.metadata["dataset_version"].value == f"{FAMILY}-v3"


def _node(result, key: dg.AssetKey, name: str):
    """The evaluation of the condition named `name` in the asset's condition tree."""
    todo = [r for r in result.results if r.key == key]
    while todo:
        node = todo.pop()
        if node.condition.name == name:
            return node
        todo += node.child_results
    raise AssertionError(f"no {name} under {key}")


def _keys(subset) -> set[str]:
    return {str(k) for k in subset.subset_value.get_partition_keys()}
