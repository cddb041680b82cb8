"""The cluster profile on real services: a Postgres instance and MLflow store (one fresh database each, dropped
afterwards), Celery workers on RabbitMQ/Redis for the `cpu` and `gpu` queues, the daemon's run queue. One cluster
is started for the module (the processes are stopped, by their own process groups, even when a test fails).

The chain: a small version built through the `cpu` worker and two trainings submitted at the same moment to a
`gpu` worker that could run two tasks at once (only the run queue's and the pool's limits keep them apart). Its
outputs are compared with the same chain run in-process on a SQLite instance. (`make cluster-demo` also runs
the evaluation through the `gpu` queue; here it is left out to save time.)
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from lora_pipeline import cli_jobs
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.defs import partitions
from lora_pipeline.runs import queue
from lora_pipeline.runs.outcome import run_failure_reason
from lora_pipeline.runs.postgres import create_database, drop_database
from lora_pipeline_tests.helpers import committed_data, free_port
from scripts.cluster import Cluster, environment

SERVER = "postgresql://postgres@127.0.0.1:5432"
REPO_DATA = committed_data()  # the samples as git has them, never the working folder's data/
VERSION, RECIPES, BIG = "tiny-v1", ("r1", "r2"), "big-v1"
RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
# Header keys that name the run itself: its MLflow run, start and save times, the session id derived from them (and
# the file hash, which covers them).
RUN_KEYS = {"lora_pipeline.mlflow_run_id", "ss_training_started_at", "ss_training_finished_at", "ss_session_id",
            "modelspec.date", "sshs_model_hash"}


def _data_root(path: Path, tiny_model) -> DataRoot:
    """The sample batch curated-2026-10 as a 1-repeat spec, two quick recipes on tiny-sd, and a big batch of
    invalid images (for a copy long enough to kill) with its spec."""
    root = DataRoot(path)
    shutil.copytree(REPO_DATA / "sources" / "curated-2026-10", root.batch("curated-2026-10"))
    spec = yaml.safe_load((REPO_DATA / "specs" / "hardware-design-aesthetic-v1.yaml").read_text())
    root.specs.mkdir(parents=True)
    (root.spec_file(VERSION)).write_text(yaml.safe_dump({**spec, "name": VERSION, "repeats": 1}))
    recipe = yaml.safe_load((REPO_DATA / "recipes" / "demo-tiny.yaml").read_text())
    recipe.update(epochs=2, train_batch_size=4, validation_split=0.25, sample_prompts=recipe["sample_prompts"][:1],
                  sample_steps=2, eval_weights=[1.0])
    root.recipes.mkdir(parents=True)
    for name, seed in zip(RECIPES, (42, 7), strict=True):
        root.recipe_file(name).write_text(yaml.safe_dump({**recipe, "seed": seed}))
    big = root.batch("big")
    big.mkdir(parents=True)
    payload = os.urandom(200_000)
    for i in range(300):
        (big / f"{i:03d}.png").write_bytes(bytes([i % 256]) + payload)
    (big / "_READY").write_text("")
    root.spec_file(BIG).write_text(yaml.safe_dump({"name": BIG, "trigger": "big", "repeats": 1,
                                                   "sources": [{"batch": "big"}]}))
    root.models.mkdir()
    os.symlink(tiny_model("tiny-sd"), root.models / "tiny-sd")
    return root


@pytest.fixture
def cluster(tmp_path_factory, tiny_model):
    """The cluster of the one test below (one test, so that xdist cannot split it over two test processes and
    start the cluster twice); its processes are stopped and its databases dropped even when a check fails."""
    name = f"lp_test_{uuid.uuid4().hex[:10]}"
    base = tmp_path_factory.mktemp("cluster")
    root = _data_root(base / "data", tiny_model)
    databases = [f"{name}_dagster", f"{name}_mlflow"]
    created = []
    try:
        urls = []
        for db in databases:
            urls.append(create_database(SERVER, db))
            created.append(db)
        with Cluster(home=base / "home", data=root.root, dagster_db=urls[0], mlflow_db=urls[1],
                     mlflow_port=free_port(), web_port=None, queue_prefix=f"{name}-", gpu_workers=2,
                     automation=False) as running:
            yield running, root
    finally:
        for db in created:
            drop_database(SERVER, db)


def _step_times(inst: dg.DagsterInstance, run_id: str, step: str) -> tuple[float, float]:
    """(start, end) unix times of a step, from the run's events in the instance."""
    start = end = None
    for entry in inst.all_logs(run_id):
        event = entry.dagster_event
        if event is None or event.step_key != step:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            start = entry.timestamp
        elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            end = entry.timestamp
    assert start is not None and end is not None, f"{step} of run {run_id} did not start and end"
    return start, end


@pytest.fixture
def cluster_env(cluster, monkeypatch):
    """This process's environment is the cluster's for the test: CLI calls submit runs to it."""
    for key, value in cluster[0].env().items():
        monkeypatch.setenv(key, value)
    return cluster


@pytest.fixture
def chain(cluster):
    """Build through the cluster and two trainings submitted at once: what the tests read."""
    running, root = cluster
    with environment(running.env()), dg.DagsterInstance.get() as inst:
        built = cli_jobs.build_version(root, VERSION, quiet=True)
        partitions.register(inst, partitions.dataset_versions, [VERSION])
        partitions.register(inst, partitions.training_runs, [partitions.training_key(VERSION, r) for r in RECIPES])
        run_ids = [queue.submit(inst, "train_job", partitions.training_key(VERSION, r), RUN_CONFIG)
                   for r in RECIPES]
        runs = [queue.wait(inst, run_id, timeout_s=600) for run_id in run_ids]
        assert [r.status for r in runs] == [dg.DagsterRunStatus.SUCCESS] * 2
        times = [_step_times(inst, run_id, "lora_epochs") for run_id in run_ids]
    return {"built": built, "train_runs": run_ids, "times": times}


def _celery_workers(inst: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """Step key -> the name (before @host) of the Celery worker that executed it, from the run's engine events."""
    found = {}
    for event in queue.run_events(inst, run_id):
        data = event.engine_event_data if event.event_type == dg.DagsterEventType.ENGINE_EVENT else None
        if data is not None and "Celery worker" in data.metadata:
            found[str(event.step_key)] = str(data.metadata["Celery worker"].value).split("@")[0]
    return found


def _tensors_and_header(path: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


def check_the_chain_matches_the_in_process_run(cluster_env, chain, tmp_path, monkeypatch, tiny_model) -> None:
    running, root = cluster_env
    with dg.DagsterInstance.get() as inst:
        workers = {}
        for run_id in (chain["built"]["dagster_run_id"], *chain["train_runs"]):
            workers |= _celery_workers(inst, run_id)
    prefix = running.queue_prefix
    assert workers == {"dataset_snapshot": f"{prefix}cpu", "caption_set": f"{prefix}cpu",
                       "dataset_report": f"{prefix}cpu", "lora_epochs": f"{prefix}gpu"}
    # The same chain in this process, on the embedded SQLite instance and MLflow store.
    local = _data_root(tmp_path / "data", tiny_model)
    for var in ("LORA_PIPELINE_EXECUTOR", "LORA_PIPELINE_DAGSTER_PG_URL", "LORA_PIPELINE_MLFLOW_URI"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORA_PIPELINE_DATA", str(local.root))
    built = cli_jobs.build_version(local, VERSION, quiet=True)
    trained = cli_jobs.train_version(local, VERSION, RECIPES[0], quiet=True)
    assert built["manifest_root"] == chain["built"]["manifest_root"]
    ours = sorted(root.loras(VERSION, RECIPES[0]).glob("*.safetensors"))
    theirs = sorted(Path(p) for p in trained["epoch_files"])
    assert [p.name for p in ours] == [p.name for p in theirs] and len(ours) == 2
    for a, b in zip(ours, theirs, strict=True):
        (ta, ha), (tb, hb) = _tensors_and_header(a), _tensors_and_header(b)
        assert ta == tb  # every tensor byte-identical
        differ = {k for k in ha.keys() | hb.keys() if ha.get(k) != hb.get(k)}
        # ... and the base model's path, which is under each run's own data root
        assert differ - {"lora_pipeline.base_model_source"} <= RUN_KEYS
        assert ha["lora_pipeline.base_model_source"].endswith("/models/tiny-sd")
        assert hb["lora_pipeline.base_model_source"].endswith("/models/tiny-sd")
        assert ha["lora_pipeline.manifest_root"] == chain["built"]["manifest_root"]


def check_mlflow_runs_are_in_the_postgres_store(cluster_env, chain) -> None:
    running, root = cluster_env
    client = MlflowClient(tracking_uri=running.mlflow_db)  # the Postgres store itself, not the server
    experiment = client.get_experiment_by_name("lora-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    training = {r.data.tags.get("recipe"): r for r in runs if r.data.tags.get("recipe") in RECIPES}
    assert set(training) == set(RECIPES) and all(r.info.status == "FINISHED" for r in training.values())
    assert training["r1"].data.tags["manifest_root"] == chain["built"]["manifest_root"]
    assert [m.step for m in client.get_metric_history(training["r1"].info.run_id, "loss")] == [1, 2, 3, 4]
    artifacts = [a.path for a in client.list_artifacts(training["r1"].info.run_id, "epochs")]
    assert len(artifacts) == 2 and Path(experiment.artifact_location).is_relative_to(root.root / "mlflow")


def check_two_trainings_launched_at_once_never_trained_at_the_same_time(chain) -> None:
    (start_a, end_a), (start_b, end_b) = sorted(chain["times"])
    assert end_a <= start_b, f"trainings overlapped: {chain['times']}"


def _pool_worker(running: Cluster) -> psutil.Process:
    """The process of the cpu worker's pool that executes its tasks (the Celery worker's forked child)."""
    top = psutil.Process(running.processes["worker-cpu"].pid)
    deepest = [p for p in top.children(recursive=True) if not p.children()]
    assert len(deepest) == 1, deepest
    return deepest[0]


def check_a_worker_killed_during_a_snapshot_copy_fails_the_step_and_a_rerun_completes(cluster_env) -> None:
    running, root = cluster_env
    victim = _pool_worker(running)
    with dg.DagsterInstance.get() as inst:
        partitions.register(inst, partitions.source_batches, root.ready_batches())
        partitions.register(inst, partitions.dataset_versions, [BIG])
        run_id = queue.submit(inst, "build_dataset_job", BIG, RUN_CONFIG)
        deadline = time.monotonic() + 120
        while not list(root.datasets.glob(f".{BIG}.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.0005)
        victim.send_signal(signal.SIGKILL)
        run = queue.wait(inst, run_id, timeout_s=120)
        assert run.status == dg.DagsterRunStatus.FAILURE
        reason = run_failure_reason(queue.run_events(inst, run_id))
        assert "[dataset_snapshot]" in reason and "WorkerLostError" in reason and "SIGKILL" in reason, reason
        assert not root.dataset(BIG).exists(), "a half version under the final name"
        rerun = queue.run_events(inst, queue.wait(inst, queue.submit(
            inst, "build_dataset_job", BIG, RUN_CONFIG), timeout_s=300).run_id)
    snapshot_done = [e for e in rerun if e.event_type == dg.DagsterEventType.STEP_SUCCESS
                     and e.step_key == "dataset_snapshot"]
    assert snapshot_done and (root.dataset(BIG) / "manifest.jsonl").is_file()
    assert not list(root.datasets.glob(f".{BIG}.tmp-*"))


def test_the_cluster_profile_on_real_services(cluster_env, chain, tmp_path, monkeypatch, tiny_model) -> None:
    """Each check names what it shows; they share one cluster and one chain."""
    check_two_trainings_launched_at_once_never_trained_at_the_same_time(chain)
    check_mlflow_runs_are_in_the_postgres_store(cluster_env, chain)
    check_a_worker_killed_during_a_snapshot_copy_fails_the_step_and_a_rerun_completes(cluster_env)
    check_the_chain_matches_the_in_process_run(cluster_env, chain, tmp_path, monkeypatch, tiny_model)
