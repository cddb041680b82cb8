"""Training runs that die or collide, through the real console script and Dagster instance.

A SIGKILLed `train` must not keep the `gpu` pool slot (the next `train` starts at once and marks the dead
run failed); two instances training one folder: the second is refused. (A version given as a path is refused
by the CLI's name check, test_bad_inputs; the trainer's own refusal is in test_training_trainer.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml

from lora_pipeline.defs import partitions
from lora_pipeline.defs.run_health import PID_TAG, dead_run_sensor, fail_dead_runs, process_alive
from lora_pipeline.runs.instance import definitions, instance
from lora_pipeline.runs.jobs import run_job
from lora_pipeline_tests.helpers import assert_one_line_error

VERSION, RECIPE = "mini-v1", "mini"
EXE = str(Path(sys.executable).with_name("lora-pipeline"))


@pytest.fixture
def mini(sample_root):
    """A built 8-image version (repeats 1) and a one-epoch tiny recipe: a whole `train` takes seconds."""
    spec = yaml.safe_load(sample_root.spec_file("hardware-design-aesthetic-v1").read_text())
    spec.update(name=VERSION, repeats=1)
    sample_root.spec_file(VERSION).write_text(yaml.safe_dump(spec))
    recipe = yaml.safe_load(sample_root.recipe_file("demo-tiny").read_text())
    recipe.update(name=RECIPE, epochs=1, train_batch_size=4)
    sample_root.recipe_file(RECIPE).write_text(yaml.safe_dump(recipe))
    inst = instance()
    partitions.register(inst, partitions.source_batches, sample_root.ready_batches())
    partitions.register(inst, partitions.dataset_versions, [VERSION])
    run_job("build_dataset_job", VERSION, inst, quiet=True)
    return sample_root, inst


def _train(**env: str) -> subprocess.Popen:
    return subprocess.Popen([EXE, "train", VERSION, "--recipe", RECIPE, "--json"], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        assert process.poll() is None, f"train ended before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"no {what} after 300 s"
        time.sleep(0.05)


def test_a_killed_train_is_marked_failed_and_the_next_starts_at_once(mini):
    root, inst = mini
    first = _train()
    _wait_for(lambda: inst.event_log_storage.get_concurrency_info("gpu").claimed_slots, first, "gpu slot claimed")
    first.send_signal(signal.SIGKILL)
    first.communicate()
    [dead] = inst.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    dead_id = dead.dagster_run.run_id
    assert dead.dagster_run.tags[PID_TAG] == str(first.pid)
    assert [s.run_id for s in inst.event_log_storage.get_concurrency_info("gpu").claimed_slots] == [dead_id]

    launched = time.time()
    second = subprocess.run([EXE, "train", VERSION, "--recipe", RECIPE, "--json"], capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr
    assert second.stderr.splitlines() == [
        f"note: run {dead_id} of train_job ({VERSION}|{RECIPE}) was STARTED but its process {first.pid} is gone: "
        "marked it failed and freed its pool slots"]
    assert inst.get_run_by_id(dead_id).status == dg.DagsterRunStatus.FAILURE
    assert not inst.event_log_storage.get_concurrency_info("gpu").claimed_slots
    [done] = inst.get_run_records(dg.RunsFilter(job_name="train_job", statuses=[dg.DagsterRunStatus.SUCCESS]))
    [step_start] = inst.get_records_for_run(done.dagster_run.run_id, of_type=dg.DagsterEventType.STEP_START).records
    waited = step_start.event_log_entry.timestamp - launched
    print(f"next train: its training step started {waited:.1f} s after the command was launched")
    assert waited < 120  # process start and imports on a loaded machine; before the fix it waited forever
    assert len(list(root.loras(VERSION, RECIPE).glob("*.safetensors"))) == 1


def test_a_second_instance_training_the_same_folder_is_refused(mini, tmp_path):
    root, _ = mini
    out = root.loras(VERSION, RECIPE)
    first = _train()
    _wait_for(lambda: (out / ".lock").is_file() and (out / ".lock").read_text() == f"{first.pid}\n", first,
              "output lock taken")
    first.send_signal(signal.SIGSTOP)  # holds the lock, paused: however fast it trains, the second meets it
    other_home = tmp_path / "other_dagster_home"
    other_home.mkdir()
    second = subprocess.run([EXE, "train", VERSION, "--recipe", RECIPE], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "DAGSTER_HOME": str(other_home)})
    first.send_signal(signal.SIGCONT)
    assert_one_line_error(second, str(out), f"already being trained by pid {first.pid}")
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert [Path(f).name for f in yaml.safe_load(stdout)["epoch_files"]] == [f"{VERSION}-{RECIPE}-e001.safetensors"]


def test_a_pid_counts_as_the_runs_process_only_if_that_process_is_older_than_the_record():
    ended = subprocess.Popen(["true"])
    ended.wait()  # reaped: its pid names no process now
    dead_pid = ended.pid
    now = time.time()
    assert process_alive(os.getpid(), now)
    assert not process_alive(dead_pid, now)
    # the pid exists, but its process started an hour after the run recorded it: a reused number
    assert not process_alive(os.getpid(), psutil.Process().create_time() - 3600)


def _dead_started_run(inst: dg.DagsterInstance) -> str:
    """A STARTED train_job run holding the `gpu` slot whose process (a real one, ended) is gone."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    job = definitions().resolve_job_def("train_job")
    run = inst.create_run_for_job(job, tags={PID_TAG: str(ended.pid)}, status=dg.DagsterRunStatus.STARTED)
    inst.event_log_storage.initialize_concurrency_limit_to_default("gpu")  # as a step does (dagster.yaml: 1)
    assert inst.event_log_storage.claim_concurrency_slot("gpu", run.run_id, "lora_epochs").is_claimed
    return run.run_id


def test_the_asset_check_and_the_sensor_fail_a_dead_run_and_free_its_slot(sample_root):
    inst = instance()
    dead = _dead_started_run(inst)
    lines: list[str] = []
    assert fail_dead_runs(inst, lines.append) == [dead]  # what lora_epochs calls, with its log
    assert lines == [f"run {dead} of train_job was STARTED but its process {inst.get_run_by_id(dead).tags[PID_TAG]} "
                     "is gone: marked it failed and freed its pool slots"]
    assert inst.get_run_by_id(dead).status == dg.DagsterRunStatus.FAILURE
    assert not inst.event_log_storage.get_concurrency_info("gpu").claimed_slots
    again = _dead_started_run(inst)
    assert dead_run_sensor(dg.build_sensor_context(instance=inst)).skip_message == \
        "failed 1 run(s) whose process is gone"
    assert inst.get_run_by_id(again).status == dg.DagsterRunStatus.FAILURE
    assert dead_run_sensor(dg.build_sensor_context(instance=inst)).skip_message == "no dead runs"
