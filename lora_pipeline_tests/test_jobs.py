"""Running jobs for the CLI: a user's mistake comes back as UserError from Dagster's structured step failure."""

from __future__ import annotations

import pytest

from lora_pipeline.core.errors import UserError
from lora_pipeline.defs import partitions
from lora_pipeline.defs.failures import USER_ERROR
from lora_pipeline.defs.schedules import VERIFY_STEP
from lora_pipeline.runs.instance import instance
from lora_pipeline.runs.jobs import run_job


@pytest.fixture
def inst(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_PIPELINE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    return instance()


def test_a_user_error_in_an_asset_is_a_structured_failure_and_comes_back_as_user_error(inst, tmp_path):
    partitions.register(inst, partitions.source_batches, ["never-landed"])
    with pytest.raises(UserError) as raised:
        run_job("register_batch_job", "never-landed", inst, quiet=True)
    assert str(raised.value).startswith(str(tmp_path / "data" / "sources" / "never-landed"))  # the line, no class
    run = inst.get_runs()[0]
    failure = next(e for e in inst.all_logs(run.run_id) if e.is_dagster_event and e.dagster_event.is_step_failure)
    user_failure = failure.dagster_event.step_failure_data.user_failure_data
    assert user_failure.metadata[USER_ERROR].value is True and user_failure.description == str(raised.value)


def test_a_step_whose_failure_is_its_result_returns_only_when_the_caller_expects_it(inst, tmp_path):
    snapshot = tmp_path / "data" / "datasets" / "v1"
    snapshot.mkdir(parents=True)
    (snapshot / "snapshot.json").write_text('{"version": "v1", "manifest_root": "0"}')  # built, never sealed
    config = {VERIFY_STEP: {"config": {"versions": ["v1"]}}}
    outcome = run_job("verify_snapshots_job", None, inst, True, config, reports_by_failing={VERIFY_STEP})
    failure = outcome.failure(VERIFY_STEP)
    assert not outcome.success and failure.reported and not failure.user_error
    assert failure.metadata["findings"] == [] and failure.metadata["unsealed"][0].startswith("v1: not sealed yet")
    with pytest.raises(RuntimeError, match=f"verify_snapshots_job failed in {VERIFY_STEP}: 1 named version"):
        run_job("verify_snapshots_job", None, inst, True, config)
