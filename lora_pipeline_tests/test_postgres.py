"""Postgres stopped or unreachable (cluster profile): the CLI and the daemon's launch say so in one line, exit 1,
and nothing is written. "Stopped" is a port nobody listens on, and a database the server does not have."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lora_pipeline.core.settings import env_name
from lora_pipeline_tests.helpers import assert_one_line_error, cli, tree_state

PG_URL_ENV = env_name("dagster_pg_url")
NOBODY_LISTENS = "postgresql+psycopg2://postgres@127.0.0.1:1/lora_pipeline"
NO_SUCH_DATABASE = "postgresql+psycopg2://postgres@127.0.0.1:5432/lora_pipeline_no_such_database"


@pytest.mark.parametrize("url, reason", [(NOBODY_LISTENS, "Connection refused"),
                                         (NO_SUCH_DATABASE, "does not exist")])
def test_the_cli_says_postgres_is_unreachable_in_one_line_and_writes_nothing(sample_root, monkeypatch, url, reason):
    before = tree_state(sample_root.root)
    home = os.environ["DAGSTER_HOME"]
    monkeypatch.setenv(PG_URL_ENV, url)
    for args in (["build", "hardware-design-aesthetic-v1"], ["demo"]):
        result = cli(*args, check=False)
        assert_one_line_error(result, "Postgres at 127.0.0.1:", "is unreachable", reason)
    assert tree_state(sample_root.root) == before  # no dataset, staging folder or cache
    assert os.listdir(home) == []  # no instance storage either


def test_the_daemon_is_not_started_when_postgres_does_not_answer(tmp_path, monkeypatch):
    marker = tmp_path / "started"
    monkeypatch.setenv(PG_URL_ENV, NOBODY_LISTENS)
    # what `make cluster-demo` and deploy/cluster run: the check, then exec of the daemon (here a stand-in command
    # that would leave a marker: the check must stop before it)
    result = subprocess.run(
        [sys.executable, "-m", "lora_pipeline.runs.exec", "--", "touch", str(marker)],
        capture_output=True, text=True, timeout=60,
    )
    assert_one_line_error(result, "Postgres at 127.0.0.1:1/lora_pipeline is unreachable")
    assert not marker.exists()
