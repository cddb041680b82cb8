"""The cluster profile (deploy/cluster/) started on one machine: Dagster's webserver and daemon on a Postgres
instance, one Celery worker per queue, an MLflow server on Postgres. `make cluster-demo` runs the demo chain
through them (`python scripts/cluster.py demo`); the tests (lora_pipeline_tests/test_cluster.py) start the same
processes.

Every process is started in its own session and stopped by its process group id (SIGTERM, then SIGKILL after
a grace period), so nothing else on the machine is touched. The commands are the ones a multi-machine
deployment runs on each machine (README, "Running on several machines").
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import REPO_ROOT
from lora_pipeline.core.settings import env_vars, settings
from lora_pipeline.defs.placement import CPU, GPU
from lora_pipeline.runs.exec import checked
from lora_pipeline.runs.postgres import create_database, drop_database, libpq_url, require_postgres

PROFILE = REPO_ROOT / "deploy" / "cluster"
BIN = Path(sys.executable).parent
STOP_GRACE_S = 10.0


@dataclass
class Cluster:
    """The processes of the profile on this machine, for one Dagster home, data root and pair of databases."""

    home: Path  # DAGSTER_HOME: deploy/cluster/dagster.yaml is copied here
    data: Path  # the shared data root
    dagster_db: str  # Postgres URLs
    mlflow_db: str
    mlflow_port: int = 5000
    web_port: int | None = 3000  # None: no webserver
    queue_prefix: str = ""
    gpu_workers: int = 1  # processes of the gpu queue's worker (the run queue and pool still allow one at a time)
    automation: bool = True  # False: sensors and schedules are stopped before the daemon starts (demo, tests)
    broker: str = "pyamqp://guest:guest@127.0.0.1:5672//"
    backend: str = "redis://127.0.0.1:6379/0"
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def logs(self) -> Path:
        return self.home / "process-logs"  # not logs/, which Dagster clears

    def env(self) -> dict[str, str]:
        """The environment every process of the deployment shares (deploy/cluster/env.sh)."""
        return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DAGSTER_HOME": str(self.home),
                **env_vars(data=str(self.data), dagster_pg_url=self.dagster_db, executor="celery",
                           celery_broker=self.broker, celery_backend=self.backend, queue_prefix=self.queue_prefix,
                           mlflow_uri=self.mlflow_uri),
                # the pipeline runs no MLflow server jobs (its GenAI scorers): off, the server starts no huey workers
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def commands(self) -> dict[str, list[str]]:
        """Name -> command line of each process, as run on the machines of a deployment."""
        worker = [str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app",
                  "-y", str(PROFILE / "celery.yaml")]
        commands = {
            "daemon": checked([str(BIN / "dagster-daemon"), "run", "-w", str(REPO_ROOT / "workspace.yaml")]),
            f"worker-{CPU}": checked([*worker, "-q", self.queue_prefix + CPU, "-n", f"{self.queue_prefix}{CPU}@%h",
                                      "--", "--concurrency=1"]),
            f"worker-{GPU}": checked([*worker, "-q", self.queue_prefix + GPU, "-n", f"{self.queue_prefix}{GPU}@%h",
                                      "--", f"--concurrency={self.gpu_workers}"]),
            "mlflow": checked([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port),
                               "--backend-store-uri", self.mlflow_db,
                               "--default-artifact-root", str(self.data / "mlflow" / "artifacts"),
                               "--no-serve-artifacts", "--workers", "1"], self.mlflow_db),
        }
        if self.web_port is not None:
            commands["webserver"] = checked([str(BIN / "dagster-webserver"), "-h", "127.0.0.1",
                                             "-p", str(self.web_port), "-w", str(REPO_ROOT / "workspace.yaml")])
        return commands

    def start(self) -> None:
        """Start every process (the instance's database must exist); `stop` ends them. A caller that runs CLI
        commands against the cluster applies `env()` to its own environment (the demo does)."""
        import dagster as dg

        require_postgres(self.dagster_db)
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        shutil.copyfile(PROFILE / "dagster.yaml", self.home / "dagster.yaml")
        env = self.env()
        with environment(env), dg.DagsterInstance.from_config(str(self.home)) as inst:  # creates the schema
            if not self.automation:  # once, before several processes would race to create it
                from lora_pipeline.runs.dagster_internals import stop_automation

                stop_automation(inst)  # before the daemon's first tick
        for name, argv in self.commands().items():
            with open(self.logs / f"{name}.log", "ab") as log:
                self.processes[name] = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log,
                                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until the servers answer, each worker says it is ready and the daemon's run queue beats."""
        deadline = time.monotonic() + timeout_s
        checks: dict[str, Callable[[], bool]] = {
            "mlflow": lambda: _answers(f"{self.mlflow_uri}/health"),
            f"worker-{CPU}": lambda: b" ready." in (self.logs / f"worker-{CPU}.log").read_bytes(),
            f"worker-{GPU}": lambda: b" ready." in (self.logs / f"worker-{GPU}.log").read_bytes(),
            "daemon": self._daemon_beats,
        }
        if self.web_port is not None:
            checks["webserver"] = lambda: _answers(f"http://127.0.0.1:{self.web_port}/server_info")
        while checks:
            for name in list(checks):
                process = self.processes[name]
                if process.poll() is not None:
                    tail = (self.logs / f"{name}.log").read_text(errors="replace").strip().splitlines()[-5:]
                    raise RuntimeError(f"{name} exited with {process.returncode}: " + " | ".join(tail))
                if checks[name]():
                    del checks[name]
            if checks and time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout_s:.0f} s: {', '.join(checks)} (logs in {self.logs})")
            time.sleep(0.5)

    def _daemon_beats(self) -> bool:
        import dagster as dg

        with environment(self.env()), dg.DagsterInstance.from_config(str(self.home)) as inst:
            return "QUEUED_RUN_COORDINATOR" in inst.get_daemon_heartbeats()

    def stop(self) -> None:
        """SIGTERM each process group this object started, SIGKILL what is left after the grace period."""
        for process in self.processes.values():
            if process.poll() is None:
                _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
            _signal_group(process, signal.SIGKILL)  # children left behind (Celery's pool, gRPC code servers)
            process.wait()
        self.processes.clear()

    def __enter__(self) -> Cluster:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """This process's environment set to `values` inside the block, restored after it."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)  # the group this process leads (start_new_session)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


DEMO_DIR = REPO_ROOT / ".cluster_demo"  # git-ignored: the demo's Dagster home, data root and process logs


def _fresh_data_root(data: Path) -> None:
    """A data root holding copies of the repository's sample sources, specs and recipes (and its base models)."""
    shutil.rmtree(data, ignore_errors=True)
    for part in ("sources", "specs", "recipes"):
        shutil.copytree(REPO_ROOT / "data" / part, data / part)
    models = REPO_ROOT / "data" / "models"
    if models.is_dir():
        shutil.copytree(models, data / "models", symlinks=True)


def demo(hold: bool = False) -> int:
    """`make cluster-demo`: the demo chain through the cluster profile on this machine; see the module doc."""
    started = time.monotonic()
    server = libpq_url(settings().pg)
    require_postgres(f"{server}/postgres")
    names = demo_database_names()
    try:
        cluster = Cluster(home=DEMO_DIR / "dagster_home", data=DEMO_DIR / "data",
                          dagster_db=create_database(server, names[0]), mlflow_db=create_database(server, names[1]),
                          mlflow_port=port_setting("CLUSTER_MLFLOW_PORT", 5050),
                          web_port=port_setting("CLUSTER_WEB_PORT", 3030), automation=False)
        return _demo(cluster, started, hold)
    finally:  # this run's own databases: nobody else's are touched, and none is left behind
        for name in names:
            drop_database(server, name)


def demo_database_names() -> tuple[str, str]:
    """The Dagster and MLflow databases of one `make cluster-demo`: named after the user and the run, so that two
    people (or two runs) on one Postgres server never drop each other's."""
    user = "".join(c for c in getpass.getuser().lower() if c.isalnum())[:16] or "user"
    run = f"{user}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    return f"lora_demo_{run}_dagster", f"lora_demo_{run}_mlflow"


def port_setting(variable: str, default: int) -> int:
    value = os.environ.get(variable, "").strip() or str(default)
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise UserError(f"${variable} must be a port number (1-65535), got {value!r}")
    return int(value)


def _demo(cluster: Cluster, started: float, hold: bool) -> int:
    from lora_pipeline import cli

    _fresh_data_root(cluster.data)
    shutil.rmtree(cluster.home, ignore_errors=True)
    print("starting:", flush=True)
    for name, argv in cluster.commands().items():
        print(f"  {name:10s} {' '.join(argv)}", flush=True)
    with cluster, environment(cluster.env()):  # the CLI below submits its runs to the cluster
        ready = time.monotonic() - started
        print(f"all processes ready after {ready:.0f} s; running `lora-pipeline demo` through them", flush=True)
        code = cli.main(["demo"])
        print(demo_summary(cluster, code, time.monotonic() - started, hold), flush=True)
        if hold:
            with contextlib.suppress(KeyboardInterrupt, EOFError):
                input("press Enter (or Ctrl-C) to stop the cluster ")
    print("stopped every process the demo started", flush=True)
    return code


def demo_summary(cluster: Cluster, code: int, seconds: float, hold: bool) -> str:
    """What the demo prints at its end. Without HOLD its servers stop with it, and the lines say so rather than
    leave a user opening the URL of a server that is gone."""
    up = "" if hold else " (stopped with the demo; HOLD=1 keeps it up)"
    return "\n".join([
        "",
        f"cluster-demo: {'done' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s",
        f"  Dagster UI  http://127.0.0.1:{cluster.web_port}{up}",
        f"  MLflow UI   {cluster.mlflow_uri}{up}; artifacts in {cluster.data / 'mlflow' / 'artifacts'}",
        f"  databases   {cluster.dagster_db.rsplit('/', 1)[-1]}, {cluster.mlflow_db.rsplit('/', 1)[-1]} "
        "(this run's own, dropped when it stops)",
        f"  data root   {cluster.data}",
        f"  logs        {cluster.logs}/ (one per process; the Celery workers log each step they ran)",
    ])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["demo"]:
        print("usage: python scripts/cluster.py demo [--hold]", file=sys.stderr)
        return 2
    try:
        return demo(hold="--hold" in args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
