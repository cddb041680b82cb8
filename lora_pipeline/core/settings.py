"""The pipeline's settings: every `LORA_PIPELINE_*` environment variable, read in one place.

`settings()` reads the environment each time it is called (it is cheap), so a process, or a test, that changes
a variable sees the new value at the next read. An empty variable counts as unset. A bad value is one UserError
line naming the variable. The README's table of the variables is rendered from this class (`make docs`,
scripts/settingsdocs.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lora_pipeline.core.errors import UserError

ENV_PREFIX = "LORA_PIPELINE_"
Executor = Literal["default", "celery", "k8s"]


def _digits_only(value: Any) -> Any:
    """A whole number from the environment is digits only: pydantic alone would take "2.0" as 2."""
    if isinstance(value, str) and not value.strip().isdigit():
        raise ValueError("not a whole number")
    return value


WholeNumber = Annotated[int, BeforeValidator(_digits_only)]


class Settings(BaseSettings):
    """What a deployment sets; the embedded default (`make demo`) needs none of it."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore", frozen=True)

    data: Path | None = Field(None, description=(
        "The data root: sources, specs, recipes, datasets, LoRAs, evaluations, models, MLflow. Unset: `./data` of "
        "the repository. In the cluster profiles, the one shared folder every machine mounts at the same path."))
    executor: Executor = Field("default", description=(
        "The executor of every job, chosen when the code location loads (every process of a deployment must "
        "agree): `default` runs each step in the run's own process; `celery` sends steps to the Celery queues "
        "(deploy/cluster/); `k8s` runs each step in a pod (deploy/k8s/)."))
    dagster_pg_url: str | None = Field(None, description=(
        "The Dagster instance's Postgres database in the cluster profile (`postgresql+psycopg2://...`; "
        "deploy/cluster/dagster.yaml reads it). The CLI and every cluster process check first that it answers. "
        "Unset: the instance in `$DAGSTER_HOME` needs no server (SQLite)."))
    celery_broker: str | None = Field(None, description=(
        "The Celery broker (RabbitMQ) of the `celery` executor; read by dagster-celery in each run worker and by "
        "the Celery workers (deploy/cluster/celery.yaml)."))
    celery_backend: str | None = Field(None, description=(
        "The Celery result backend (Redis) of the `celery` executor; read like the broker."))
    queue_prefix: str = Field("", description=(
        "Put before the Celery queue names `cpu` and `gpu`, so that two deployments (or test sessions) can share "
        "one broker; every process of a deployment must see the same value."))
    mlflow_uri: str | None = Field(None, description=(
        "An MLflow tracking server that trainings log to (the cluster profile: a server on Postgres). Unset: the "
        "SQLite store in the data root's `mlflow/`."))
    train_processes: WholeNumber = Field(1, ge=1, description=(
        "Processes (GPUs) one training runs in when the launcher resource's `num_processes` is 0: more than 1 "
        "trains data-parallel through `accelerate launch`."))
    arrival_settle_seconds: float = Field(10.0, ge=0, le=3600, allow_inf_nan=False, description=(
        "Safe arrival: a batch folder under `sources/` is registered only once its listing (names, sizes, "
        "modification times) has stayed the same between two looks of the batch sensor at least this many "
        "seconds apart (the sensor ticks every 30 s, so a batch lands on its second tick at the soonest)."))
    pg: str = Field("postgresql://postgres@127.0.0.1:5432", description=(
        "The Postgres server (no database) that `make cluster-demo` makes its two databases on; "
        "deploy/cluster/env.sh builds the cluster's database URLs from it."))

    @field_validator("data")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.expanduser().resolve() if value is not None else None


def env_name(field: str) -> str:
    """The environment variable of a settings field: `env_name("data")` is LORA_PIPELINE_DATA."""
    if field not in Settings.model_fields:
        raise KeyError(f"no setting {field!r}")
    return ENV_PREFIX + field.upper()


def env_vars(**values: str) -> dict[str, str]:
    """Variables that give these settings to a process: `env_vars(executor="celery")` is
    {"LORA_PIPELINE_EXECUTOR": "celery"}."""
    return {env_name(field): value for field, value in values.items()}


def _expected(error: dict[str, Any]) -> str:
    ctx = error.get("ctx") or {}
    if error["type"] in ("int_parsing", "int_type", "value_error"):
        return "a whole number"
    if error["type"] == "literal_error":
        return f"one of {ctx['expected']}"
    if error["type"] in ("float_parsing", "float_type", "finite_number"):
        return "a number"
    if error["type"] == "greater_than_equal":
        return f"at least {ctx['ge']}"
    if error["type"] == "less_than_equal":
        return f"at most {ctx['le']}"
    return error["msg"].lower()


def settings() -> Settings:
    """The settings from this process's environment now; a bad value is a UserError naming its variable
    (the first one, when several are bad)."""
    try:
        return Settings()
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        raise UserError(f"${env_name(str(error['loc'][0]))} must be {_expected(error)}, "
                        f"got {error['input']!r}") from None
