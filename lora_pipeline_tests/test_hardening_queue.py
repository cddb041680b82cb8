"""The cluster profile with its instance reachable but nothing consuming the run queue (issue 27): `build` says so
within seconds, naming the command that starts the daemon, and never leaves a run it gave up on queued. A real
Postgres instance (a database of its own) with the cluster's dagster.yaml; no daemon runs. A daemon that stopped
is its last heartbeat, written as a daemon writes it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import dagster as dg
import pytest
from dagster._daemon.types import DaemonHeartbeat

from lora_pipeline.core.paths import REPO_ROOT
from lora_pipeline.core.settings import env_vars
from lora_pipeline.runs.postgres import create_database, drop_database
from lora_pipeline.runs.queue import HEARTBEAT_TOLERANCE_S, QUEUE_DAEMON
from lora_pipeline_tests.helpers import assert_one_line_error, cli

SERVER = "postgresql://postgres@127.0.0.1:5432"
VERSION = "hardware-design-aesthetic-v1"


@pytest.fixture
def queued_instance(sample_root, monkeypatch):
    """The cluster profile's instance on a fresh database, for the CLI (nothing started)."""
    name = f"lora_test_queue_{uuid.uuid4().hex[:12]}"
    url = create_database(SERVER, name)
    home = os.environ["DAGSTER_HOME"]
    shutil.copyfile(REPO_ROOT / "deploy" / "cluster" / "dagster.yaml", os.path.join(home, "dagster.yaml"))
    for key, value in env_vars(dagster_pg_url=url, executor="celery", queue_prefix=f"{name}-",
                               celery_broker="pyamqp://guest:guest@127.0.0.1:5672//",
                               celery_backend="redis://127.0.0.1:6379/0").items():
        monkeypatch.setenv(key, value)
    inst = dg.DagsterInstance.get()
    try:
        yield inst
    finally:
        inst.dispose()
        drop_database(SERVER, name)


def _beat(inst: dg.DagsterInstance, age_s: float) -> None:
    inst.add_daemon_heartbeat(DaemonHeartbeat(time.time() - age_s, QUEUE_DAEMON, "test-daemon"))


def test_no_daemon_is_said_at_once_and_no_run_is_made(queued_instance):
    started = time.monotonic()
    result = cli("build", VERSION, check=False)  # before the fix: waited forever, silently
    assert_one_line_error(result, "nothing consumes the instance's run queue", "dagster-daemon run")
    assert time.monotonic() - started < 60
    assert queued_instance.get_runs() == []


def test_a_daemon_that_stops_while_the_run_is_queued_cancels_the_run(queued_instance):
    _beat(queued_instance, HEARTBEAT_TOLERANCE_S - 25)  # its last beat: stale 25 s from now (the CLI is queued by then)
    result = cli("build", VERSION, check=False)
    assert_one_line_error(result, "is still queued: nothing consumes the instance's run queue", "has not beaten")
    (run,) = queued_instance.get_runs()
    assert run.status == dg.DagsterRunStatus.CANCELED  # not left QUEUED


def test_ctrl_c_while_the_run_is_queued_cancels_it(queued_instance):
    _beat(queued_instance, 0)
    # -X faulthandler: a child that does not stop prints every thread's stack on SIGABRT (once seen, on a loaded
    # clean-clone run: the child still waiting 60 s after its SIGINT; the likely cause, a Ctrl-C the interpreter
    # dropped inside a finalizer, is fixed and tested below)
    command = [sys.executable, "-X", "faulthandler", "-m", "lora_pipeline.cli", "build", VERSION]
    child = subprocess.Popen(command, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not queued_instance.get_runs() and time.monotonic() < deadline:
        time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    try:
        child.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGABRT)
        _, stderr = child.communicate(timeout=60)
        pytest.fail(f"build still running 120 s after its SIGINT; its threads:\n{stderr[-6000:]}")
    (run,) = queued_instance.get_runs()
    assert run.status == dg.DagsterRunStatus.CANCELED  # before the fix: left QUEUED


class _DropsCtrlC:
    """Sends this process a SIGINT from its finalizer and lets the handler run there: a KeyboardInterrupt raised
    inside a finalizer is dropped by the interpreter ("Exception ignored in ...")."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(200_000):  # the pending signal's handler runs within these bytecodes
            pass


def test_a_ctrl_c_landing_in_a_finalizer_still_stops_the_wait(queued_instance, monkeypatch):
    """The one hang of the test above (the CLI still waiting 60 s after its SIGINT) is what a lost Ctrl-C looks
    like: the waiter waits until the daemon's heartbeat is stale. The wait polls what the held handler noted."""
    from lora_pipeline.runs import queue

    _beat(queued_instance, 0)
    queued_instance.add_dynamic_partitions("source_batches", ["curated-2026-10"])
    checks = []
    real = queue.queue_consumer_problem

    def consumer_problem(inst):  # before the submit, then every few seconds of the wait
        checks.append(1)
        if len(checks) == 2:
            _DropsCtrlC()  # made and dropped at once: the SIGINT lands inside its finalizer
        if len(checks) > 3:  # a lost Ctrl-C: the wait goes on; stop it here, not after the heartbeat's 120 s
            return "test: the Ctrl-C was lost"
        return real(inst)

    monkeypatch.setattr(queue, "queue_consumer_problem", consumer_problem)
    with pytest.raises(KeyboardInterrupt):
        queue.submit_and_wait(queued_instance, "register_batch_job", "curated-2026-10", {})
    (run,) = queued_instance.get_runs()
    assert run.status == dg.DagsterRunStatus.CANCELED


def test_a_waiter_hears_the_progress_lines_the_steps_logged(sample_root):
    """What `build` and `train` print through the cluster while the workers run the steps (they were silent)."""
    from lora_pipeline.runs import queue
    from lora_pipeline.runs.instance import instance
    from lora_pipeline.runs.jobs import run_job

    inst = instance()
    inst.add_dynamic_partitions("source_batches", ["curated-2026-10"])
    outcome = run_job("register_batch_job", "curated-2026-10", inst, quiet=True)
    heard: list[str] = []
    queue.wait(inst, outcome.run_id, say=heard.append)
    logged = [e.user_message for e in inst.all_logs(outcome.run_id)
              if e.dagster_event is None and e.level >= 20 and e.user_message]
    assert heard == logged and heard  # every INFO line of the steps, in order, once


def test_each_cluster_demo_has_databases_of_its_own_and_checked_ports(monkeypatch):
    from lora_pipeline.core.errors import UserError
    from scripts.cluster import demo_database_names, port_setting

    first, second = demo_database_names(), demo_database_names()
    assert first != second and all(n.startswith("lora_demo_") and n.replace("_", "").isalnum() for n in first)
    monkeypatch.setenv("CLUSTER_WEB_PORT", "3031")
    assert port_setting("CLUSTER_WEB_PORT", 3030) == 3031
    monkeypatch.setenv("CLUSTER_WEB_PORT", "web")
    with pytest.raises(UserError, match=r"\$CLUSTER_WEB_PORT must be a port number"):
        port_setting("CLUSTER_WEB_PORT", 3030)


def test_the_cluster_demo_says_its_servers_stopped_and_names_make_mlflow_ui_only_for_the_local_store(tmp_path):
    """Issue 27: `make cluster-demo` ended by printing "MLflow run … in http://127.0.0.1:5050 (make mlflow-ui)":
    a server it had already stopped, and a make target that serves another store."""
    from lora_pipeline.cli_jobs import demo_mlflow_line
    from scripts.cluster import Cluster, demo_summary

    cluster = Cluster(home=tmp_path / "home", data=tmp_path / "data", dagster_db="postgresql://h/d_dagster",
                      mlflow_db="postgresql://h/d_mlflow", mlflow_port=5050, web_port=3030)
    stopped = demo_summary(cluster, 0, 95.0, hold=False)
    assert "cluster-demo: done in 95 s" in stopped
    for line in ("  Dagster UI  http://127.0.0.1:3030 (stopped with the demo; HOLD=1 keeps it up)",
                 "  MLflow UI   http://127.0.0.1:5050 (stopped with the demo; HOLD=1 keeps it up)"):
        assert line in stopped
    held = demo_summary(cluster, 1, 95.0, hold=True)
    assert "stopped" not in held.split("databases")[0] and "FAILED (exit 1)" in held
    assert demo_mlflow_line("r1", "http://127.0.0.1:5050") == "  mlflow      run r1 in http://127.0.0.1:5050"
    assert demo_mlflow_line("r1", "sqlite:////d/mlflow.db").endswith("(make mlflow-ui)")
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert "CLUSTER_WEB_PORT" in readme and "CLUSTER_MLFLOW_PORT" in readme  # the port overrides are documented
