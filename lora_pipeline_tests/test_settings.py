"""The settings: each LORA_PIPELINE_* variable reaches its field and its readers; a bad value is one line naming
the variable; a variable changed in a running process is seen at the next read."""

from __future__ import annotations

import pytest

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import REPO_ROOT, DataRoot, external_mlflow_uri
from lora_pipeline.core.settings import Settings, env_name, env_vars, settings
from lora_pipeline.defs.placement import queue_name
from lora_pipeline.defs.resources import DATA_ROOT, DataRootResource, TrainingLauncherResource


@pytest.fixture
def clean_env(monkeypatch):
    for field in Settings.model_fields:
        monkeypatch.delenv(env_name(field), raising=False)
    return monkeypatch


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("executor", "celery", "celery"),
    ("dagster_pg_url", "postgresql+psycopg2://pg/db", "postgresql+psycopg2://pg/db"),
    ("celery_broker", "pyamqp://b//", "pyamqp://b//"),
    ("celery_backend", "redis://r/0", "redis://r/0"),
    ("queue_prefix", "t1-", "t1-"),
    ("mlflow_uri", "http://mlflow:5000", "http://mlflow:5000"),
    ("train_processes", "4", 4),
    ("pg", "postgresql://pg:5433", "postgresql://pg:5433"),
])
def test_each_variable_sets_its_field(clean_env, field, value, expected):
    clean_env.setenv(env_name(field), value)
    assert getattr(settings(), field) == expected


def test_names_and_defaults(clean_env):
    assert env_name("data") == "LORA_PIPELINE_DATA" and env_name("train_processes") == "LORA_PIPELINE_TRAIN_PROCESSES"
    assert env_vars(executor="celery", queue_prefix="") == {"LORA_PIPELINE_EXECUTOR": "celery",
                                                           "LORA_PIPELINE_QUEUE_PREFIX": ""}
    with pytest.raises(KeyError, match="no setting 'datta'"):
        env_name("datta")
    defaults = settings()
    assert (defaults.data, defaults.executor, defaults.train_processes, defaults.mlflow_uri) == (None, "default", 1,
                                                                                                  None)
    assert all(field.description for field in Settings.model_fields.values())


def test_an_empty_variable_counts_as_unset(clean_env):
    for field in ("data", "executor", "train_processes", "mlflow_uri"):
        clean_env.setenv(env_name(field), "")
    assert settings() == Settings()


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("train_processes", "two", "$LORA_PIPELINE_TRAIN_PROCESSES must be a whole number, got 'two'"),
    ("train_processes", "2.0", "$LORA_PIPELINE_TRAIN_PROCESSES must be a whole number, got '2.0'"),
    ("train_processes", "0", "$LORA_PIPELINE_TRAIN_PROCESSES must be at least 1, got '0'"),
    ("executor", "Celery",
     "$LORA_PIPELINE_EXECUTOR must be one of 'default', 'celery' or 'k8s', got 'Celery'"),
])
def test_a_bad_value_is_one_line_naming_the_variable(clean_env, field, value, expected):
    clean_env.setenv(env_name(field), value)
    with pytest.raises(UserError) as raised:
        settings()
    assert str(raised.value) == expected


def test_the_readers_take_their_values_from_the_settings_at_each_read(clean_env, tmp_path):
    assert DataRoot.from_env().root == REPO_ROOT / "data" == DATA_ROOT.data.root
    clean_env.setenv(env_name("data"), str(tmp_path / "sub" / ".." / "data"))
    # the resource, its default (which the automation conditions read) and the CLI's DataRoot agree
    assert DataRoot.from_env().root == tmp_path / "data" == DATA_ROOT.data.root == DataRootResource().data.root
    assert DataRootResource(path=str(tmp_path / "other")).data.root == tmp_path / "other"  # the run's config wins
    assert external_mlflow_uri() is None
    clean_env.setenv(env_name("mlflow_uri"), "http://mlflow:5000")
    assert external_mlflow_uri() == "http://mlflow:5000"
    clean_env.setenv(env_name("queue_prefix"), "t1-")
    assert queue_name("gpu") == "t1-gpu"
    clean_env.setenv(env_name("train_processes"), "3")
    assert TrainingLauncherResource().processes == 3
