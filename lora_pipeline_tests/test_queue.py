"""Runs submitted to the run queue (the cluster profile) record where the daemon finds their code: the code
location and repository of workspace.yaml, and the Python origin a run worker loads. No daemon here: the run
stays queued (test_cluster.py runs them on real services)."""

from __future__ import annotations

import dagster as dg
import pytest

from lora_pipeline.core.settings import env_vars
from lora_pipeline.defs import partitions
from lora_pipeline.defs.run_health import HOST_TAG
from lora_pipeline.runs.queue import QUEUED_HOST, submit, submits_runs

QUEUED = {"run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator"}}


@pytest.fixture
def queued_instance(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_PIPELINE_DATA", str(tmp_path / "data"))
    (tmp_path / "home").mkdir()
    with dg.DagsterInstance.local_temp(str(tmp_path / "home"), overrides=QUEUED) as inst:
        yield inst


def test_only_a_queue_and_an_executor_other_than_the_default_submit_runs(queued_instance, monkeypatch):
    monkeypatch.setenv("LORA_PIPELINE_EXECUTOR", "default")
    assert not submits_runs(queued_instance)
    monkeypatch.setenv("LORA_PIPELINE_EXECUTOR", "celery")
    assert submits_runs(queued_instance)
    with dg.DagsterInstance.ephemeral() as in_process:
        assert not submits_runs(in_process)


def test_a_submitted_run_is_queued_with_the_origins_of_its_code(queued_instance, monkeypatch):
    cluster = env_vars(executor="celery", celery_broker="pyamqp://nobody@127.0.0.1:1//",
                       celery_backend="redis://127.0.0.1:1/0")
    for name, value in cluster.items():  # read when the run's plan is made; nothing connects to them here
        monkeypatch.setenv(name, value)
    partitions.register(queued_instance, partitions.dataset_versions, ["v1"])
    run_id = submit(queued_instance, "build_dataset_job", "v1", {}, tags={"extra": "1"})
    run = queued_instance.get_run_by_id(run_id)
    assert run.status == dg.DagsterRunStatus.QUEUED
    assert run.remote_job_origin.location_name == "lora_pipeline"  # workspace.yaml's location
    assert run.remote_job_origin.job_name == run.job_name == "build_dataset_job"
    assert run.job_code_origin.repository_origin.code_pointer.module == "lora_pipeline.definitions"
    assert run.tags["dagster/partition"] == "v1" and run.tags[HOST_TAG] == QUEUED_HOST and run.tags["extra"] == "1"
