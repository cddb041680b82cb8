"""`python -m lora_pipeline.runs.exec`, the wrapper every cluster process starts through: each bad argument, a
missing command and an unset variable that a config reads are one line and exit 1, and the command never starts
(it would leave a marker)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lora_pipeline.core.paths import REPO_ROOT
from lora_pipeline.core.settings import env_name
from lora_pipeline_tests.helpers import assert_one_line_error

PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
CELERY_YAML = str(REPO_ROOT / "deploy" / "cluster" / "celery.yaml")


def _exec(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_pipeline.runs.exec", *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=REPO_ROOT)


@pytest.fixture
def env(tmp_path, monkeypatch) -> dict[str, str]:
    """An environment with every cluster variable set and a Dagster home holding the cluster's dagster.yaml."""
    import os
    import shutil

    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(REPO_ROOT / "deploy" / "cluster" / "dagster.yaml", home / "dagster.yaml")
    values = {**os.environ, "DAGSTER_HOME": str(home), env_name("dagster_pg_url"): PG,
              env_name("celery_broker"): "pyamqp://guest:guest@127.0.0.1:5672//",
              env_name("celery_backend"): "redis://127.0.0.1:6379/0"}
    return values


@pytest.mark.parametrize("args, needle", [
    (["--postgres", "not a url", "--"], "not a Postgres URL: 'not a url'"),
    (["--postgres", "postgresql://postgres@127.0.0.1:port/x", "--"], "not a Postgres URL"),
    (["--postgres", "http://127.0.0.1:5432/x", "--"], "not a Postgres URL"),
    (["--postgres", "--"], "--postgres needs one database URL"),
    (["--postgres", "", "--"], "--postgres needs one database URL"),
    (["--verbose", "--"], "unknown option '--verbose'"),
    (["touch"], "no `--` before the command"),
])
def test_bad_arguments_are_one_line(env, tmp_path, args, needle):
    marker = tmp_path / "started"
    command = [] if args == ["touch"] else ["touch", str(marker)]
    assert_one_line_error(_exec([*args, *command], env), needle)
    assert not marker.exists()


def test_no_command_after_the_separator(env):
    assert_one_line_error(_exec(["--"], env), "no command after `--`")
    assert_one_line_error(_exec(["--postgres", PG, "--"], env), "no command after `--`")
    assert_one_line_error(_exec([], env), "no `--` before the command")


def test_a_command_that_does_not_exist(env, tmp_path):
    missing = _exec(["--", "lora-no-such-program", "run"], env)
    assert_one_line_error(missing, "command not found: 'lora-no-such-program'")
    assert_one_line_error(_exec(["--", "\r0"], env), "command not found: '\\r0'")  # found by the fuzz test
    not_a_program = tmp_path / "script"
    not_a_program.write_text("#!/no/such/interpreter\n")
    not_a_program.chmod(0o755)
    assert_one_line_error(_exec(["--", str(not_a_program)], env), f"cannot run '{not_a_program}'")


@pytest.mark.parametrize("variable, config", [
    ("dagster_pg_url", "dagster.yaml"),  # the daemon's and webserver's instance
    ("celery_backend", "celery.yaml"),  # a Celery worker's -y config
    ("celery_broker", "celery.yaml"),
])
def test_an_unset_variable_a_config_reads(env, tmp_path, variable, config):
    marker = tmp_path / "started"
    del env[env_name(variable)]
    result = _exec(["--", "touch", str(marker), "-y", CELERY_YAML], env)
    assert_one_line_error(result, config, f"${env_name(variable)}, which is not set")
    assert not marker.exists()


def test_with_everything_set_the_command_runs(env, tmp_path):
    marker = tmp_path / "started"
    result = _exec(["--postgres", PG, "--", "touch", str(marker)], env)
    assert result.returncode == 0, result.stderr
    assert marker.exists()
    assert Path(env["DAGSTER_HOME"], "dagster.yaml").is_file()
