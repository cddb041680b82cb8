"""A year of handoffs (issue 26): sensors, pages and commands at 5,000 batches, 1,000 versions, 2,000 trainings.

    .venv/bin/python benchmarks/year_bench.py [--batches 5000 --versions 1000 --trainings 2000] [--scale 0.1]
        [--workdir DIR] [--storage sqlite|postgres [--keep]] [--skip-ui] [--skip-cli] [--build-only]
        [--sources-only] [--profile]

Builds the synthetic history (benchmarks/year_history.py: every record written by the product's own code, the
slow parts skipped) under `--workdir` (reused when it already holds one of that size), on the embedded SQLite
instance or on a database of the cluster profile's Postgres server ($LORA_PIPELINE_PG, default
postgresql://postgres@127.0.0.1:5432; `year_bench_<sizes>`, created here and dropped at the end unless
`--keep`). Then measures and
prints, in seconds: one tick of each sensor (first tick without a cursor, steady tick, the ticks after one new
batch and one new spec), the automation condition evaluation, loading the definitions, the webserver's start and
GraphQL queries (benchmarks/year_ui.py), `build` of one new version here and on an empty instance, `verify` of one
version and of all, `provenance` and `lineage`, and MLflow's experiment page query (search_runs).

To time the code before a change, put that checkout first: PYTHONPATH=/path/to/old:/path/to/this (the history
builder comes from this checkout's benchmarks/, the product from the old one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from unittest.mock import patch

import yaml


def _env(workdir: Path, pg_url: str | None) -> dict[str, str]:
    env = {**os.environ, "DAGSTER_HOME": str(workdir / "dagster_home"), "LORA_PIPELINE_DATA": str(workdir / "data"),
           "LORA_PIPELINE_ARRIVAL_SETTLE_SECONDS": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if pg_url:
        env["LORA_PIPELINE_DAGSTER_PG_URL"] = pg_url
    return env


def _home(workdir: Path, pg_url: str | None) -> None:
    """$DAGSTER_HOME with the product's dagster.yaml, or the cluster profile's Postgres storage."""
    from lora_pipeline.core.paths import REPO_ROOT

    home = workdir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    if pg_url:  # the storage section of deploy/cluster/dagster.yaml (runs stay in-process: no daemon here)
        config["storage"] = {"postgres": {"postgres_url": {"env": "LORA_PIPELINE_DAGSTER_PG_URL"}}}
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def _cli(env: dict[str, str], *args: str) -> float:
    """Seconds of one `lora-pipeline` command in its own process (the interpreter's start included)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lora_pipeline.cli", *args],
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode not in (0,):
        print(f"  ! lora-pipeline {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return seconds


def _apply(inst, result) -> None:
    """What the daemon does with a tick's partition requests."""
    for request in result.dynamic_partitions_requests or []:
        inst.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))


def measure_sensors(root, inst, out: dict[str, float]) -> None:
    """Each sensor's first tick (no cursor), its steady tick, and the ticks that see one new batch / spec."""
    import dagster as dg

    from benchmarks.year_history import land_batch
    from lora_pipeline.defs.resources import DataRootResource
    from lora_pipeline.runs.instance import definitions

    repo = definitions().get_repository_def()

    def tick(name: str, cursor: str | None):
        context = dg.SensorEvaluationContext(
            instance_ref=inst.get_ref(), instance=inst, last_tick_completion_time=None, last_run_key=None,
            cursor=cursor, repository_name="__repository__", repository_def=repo,
            resources={"data_root": DataRootResource(path=str(root.root))})
        return _timed(repo.get_sensor_def(name).evaluate_tick, context)

    for name in ("source_batch_sensor", "spec_sensor"):
        out[f"{name}: first tick (no cursor)"], first = tick(name, None)
        time.sleep(2.1)  # past the watch's trust window (a folder changed just now is listed again)
        _, steady = tick(name, first.cursor)
        out[f"{name}: steady tick, nothing new"], steady = tick(name, steady.cursor)
        if name == "source_batch_sensor":
            land_batch(root, "fam000-b99999", seed=99999)  # an auto-rebuild family: a new spec is written
            out[f"{name}: tick seeing a new batch (first look)"], looked = tick(name, steady.cursor)
            out[f"{name}: tick registering it (+ auto-rebuild spec)"], done = tick(name, looked.cursor)
            _apply(inst, done)
            land_batch(root, "fam000-b99998", seed=99998)  # the next one: the specs were read once already
            _, looked = tick(name, done.cursor)
            out[f"{name}: tick registering the next batch"], again = tick(name, looked.cursor)
            for r in again.run_requests:
                if r.job_name == "build_dataset_job":
                    root.spec_file(r.partition_key).unlink()
            shutil.rmtree(root.batch("fam000-b99998"))
            for request in done.dynamic_partitions_requests or []:  # the history as it was, for the next run
                for key in request.partition_keys:
                    inst.delete_dynamic_partition(request.partitions_def_name, key)
            print(f"  new batch tick: {len(done.run_requests)} run requests")
            for r in done.run_requests:
                if r.job_name == "build_dataset_job":
                    root.spec_file(r.partition_key).unlink()
            shutil.rmtree(root.batch("fam000-b99999"))
        else:
            spec = {"name": "newfam-v1", "trigger": "trg", "repeats": 2, "sources": [{"batch": "fam001-b00000"}],
                    "captions": {"from": "sidecar"}, "checks": {"min_side": 32, "near_duplicates": "ignore"}}
            root.spec_file("newfam-v1").write_text(yaml.safe_dump(spec))
            out[f"{name}: tick seeing a new spec"], done = tick(name, steady.cursor)
            print(f"  new spec tick: {[r.partition_key for r in done.run_requests]}")
            root.spec_file("newfam-v1").unlink()
    out["dead_run_sensor: tick"], _ = tick("dead_run_sensor", None)
    # the automation as its sensor evaluates it in the code server (use_user_code_server): Dagster's own tick
    out["training_automation_sensor: first tick (no cursor)"], first = tick("training_automation_sensor", None)
    out["training_automation_sensor: next tick"], _ = tick("training_automation_sensor", first.cursor)
    asked = sorted({r.partition_key for r in first.run_requests})
    print(f"  automation's first tick asks for {len(asked)} partition(s){': ' if asked else ''}{asked[:5]}")


def measure_automation(inst, out: dict[str, float], profile: bool = False) -> None:
    import dagster as dg

    from lora_pipeline.runs.instance import definitions

    out["automation (evaluate_automation_conditions): first (no cursor)"], first = _timed(
        dg.evaluate_automation_conditions, defs=definitions(), instance=inst)
    out["automation (evaluate_automation_conditions): next (cursor)"], _ = _timed(
        dg.evaluate_automation_conditions, defs=definitions(), instance=inst, cursor=first.cursor)
    if profile:  # where the time goes: Dagster's own evaluation, or this code location's conditions
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(dg.evaluate_automation_conditions, defs=definitions(), instance=inst, cursor=first.cursor)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(18)


def measure_cli(env: dict[str, str], root, workdir: Path, history, out: dict[str, float],
                empty_pg_url: str | None = None) -> None:
    """The commands; `build` of a new version on the year's instance and on an empty one of the same storage
    (`empty_pg_url`: a database of the Postgres server with nothing in it; else SQLite)."""
    import dagster as dg

    from benchmarks.year_history import land_batch

    code = "import time; t = time.perf_counter(); from lora_pipeline.runs.instance import definitions; " \
           "definitions(); print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    out["definitions: load (in a fresh process)"] = float(done.stdout.strip().splitlines()[-1])
    # a name of its own per measurement: a workdir measured again (before/after) builds a new version again
    name = f"bench{int(time.time())}"
    spec = {"name": f"{name}-v1", "trigger": "trg", "repeats": 2, "sources": [{"batch": f"{name}-b"}],
            "captions": {"from": "sidecar"}, "checks": {"min_side": 32, "near_duplicates": "ignore"}}
    empty = workdir / "empty"
    shutil.rmtree(empty, ignore_errors=True)
    from lora_pipeline.core.paths import DataRoot

    for label, data, e in (("empty instance", DataRoot(empty / "data"), _env(empty, empty_pg_url)),
                           ("the year's instance", root, env)):
        data.specs.mkdir(parents=True, exist_ok=True)
        land_batch(data, f"{name}-b", seed=4242)
        data.spec_file(f"{name}-v1").write_text(yaml.safe_dump(spec))
        if label == "empty instance":  # its tables made before the timed build, as the year's are
            _home(empty, empty_pg_url)
            with patch.dict(os.environ, e):
                dg.DagsterInstance.from_config(e["DAGSTER_HOME"]).dispose()
        out[f"cli: build of one new version, {label}"] = _cli(e, "build", f"{name}-v1")
    out["cli: verify one version"] = _cli(env, "verify", history.versions[0])
    # twice: the first run after a build reads every file from the disk, the next from the page cache
    out["cli: verify all versions (first)"] = _cli(env, "verify")
    out["cli: verify all versions (again)"] = _cli(env, "verify")
    lora = sorted(root.loras_root.rglob("*.safetensors"))
    if lora:
        out["cli: provenance of one epoch file"] = _cli(env, "provenance", str(lora[-1]))
    out["cli: lineage batch:<first batch>"] = _cli(env, "lineage", f"batch:{history.batches[0]}")
    out["cli: lineage version:<last version>"] = _cli(env, "lineage", f"version:{history.versions[-1]}")


def measure_mlflow(root, out: dict[str, float]) -> None:
    from mlflow.tracking import MlflowClient

    from lora_pipeline.core.paths import mlflow_tracking_uri
    from lora_pipeline.core.training.run.tracking import EXPERIMENT

    client = MlflowClient(tracking_uri=mlflow_tracking_uri(root.mlflow))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return
    best = min(_timed(client.search_runs, [experiment.experiment_id], max_results=100,
                      order_by=["attributes.start_time DESC"])[0] for _ in range(3))
    out["mlflow: experiment page query (search_runs, 100 runs)"] = best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=5000)
    p.add_argument("--versions", type=int, default=1000)
    p.add_argument("--trainings", type=int, default=2000)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--workdir", default="/tmp/year_bench")
    p.add_argument("--storage", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--skip-ui", action="store_true")
    p.add_argument("--skip-cli", action="store_true")
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--sources-only", action="store_true",
                   help="the sensors' view only (sources, specs, recipes, partitions; nothing built): sensor ticks and "
                        "the automation evaluation at a size whose builds would take too long")
    p.add_argument("--profile", action="store_true", help="print the automation evaluation's profile")
    p.add_argument("--keep", action="store_true", help="keep (and reuse) the Postgres database and its workdir")
    args = p.parse_args()
    sizes = [max(1, round(n * args.scale)) for n in (args.batches, args.versions, args.trainings)]
    kind = f"{args.storage}{'-sources' if args.sources_only else ''}"
    workdir = Path(args.workdir) / f"{kind}-{'-'.join(map(str, sizes))}"
    pg_url = None
    if args.storage == "postgres":
        from lora_pipeline.core.settings import settings
        from lora_pipeline.runs.postgres import create_database, drop_database, libpq_url, sqlalchemy_url

        server = libpq_url(settings().pg)
        name = f"year_bench_{'_'.join(map(str, sizes))}"
        if (workdir / "history.json").is_file() and args.keep:  # the database a --keep run left
            pg_url = sqlalchemy_url(f"{server}/{name}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)  # its instance was a dropped database
            drop_database(server, name)
            pg_url = create_database(server, name)
    empty_pg_url = None
    if pg_url:  # for `build` on an empty instance of the same storage, dropped at the end
        drop_database(server, f"{name}_empty")
        empty_pg_url = create_database(server, f"{name}_empty")
    env = _env(workdir, pg_url)
    os.environ.update(env)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        run(args, sizes, workdir, env, pg_url, empty_pg_url)
    finally:
        if empty_pg_url:
            drop_database(server, f"{name}_empty")
        if pg_url and not args.keep:
            drop_database(server, name)
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, sizes: list[int], workdir: Path, env: dict[str, str], pg_url: str | None,
        empty_pg_url: str | None) -> None:
    from benchmarks.year_history import History, build_history
    from lora_pipeline.core.paths import REPO_ROOT, DataRoot
    from lora_pipeline.runs.instance import instance

    root = DataRoot(workdir / "data")
    record = workdir / "history.json"
    if record.is_file():
        history = History(**json.loads(record.read_text()))
        print(f"reusing {workdir} (built in {history.seconds})")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
        _home(workdir, pg_url)
        history = build_history(root, instance(), *sizes, template=REPO_ROOT / "data/recipes/demo-tiny.yaml",
                                build=not args.sources_only)
        record.write_text(json.dumps(history.__dict__))
        print(f"built {workdir}: {sizes} in {history.seconds}")
    if args.build_only:
        return
    inst = instance()
    out: dict[str, float] = {}
    measure_sensors(root, inst, out)
    measure_automation(inst, out, args.profile)
    if not (args.skip_cli or args.sources_only):
        measure_cli(env, root, workdir, history, out, empty_pg_url)
    if not (args.skip_ui or args.sources_only):
        from benchmarks.year_ui import measure_ui

        keys = {"source_batch": history.batches[0], "dataset_snapshot": history.versions[0],
                "lora_epochs": history.trainings[0]}
        out.update(measure_ui(env, workdir, keys))
    measure_mlflow(root, out)
    print(f"\n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; {args.storage}; batches/versions/trainings {sizes}; code "
          f"{Path(__import__('lora_pipeline').__file__).parent.parent}")
    for label, seconds in out.items():
        print(f"| {label} | {seconds:.2f} |")
    (workdir / f"results-{int(time.time())}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
