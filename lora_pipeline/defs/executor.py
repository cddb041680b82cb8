"""The executor of every job: in-process by default; Celery or Kubernetes steps in the cluster profiles.

`LORA_PIPELINE_EXECUTOR` picks it when the code location loads (every process of a deployment must agree):
- unset or "default": Dagster's in-process executor (the embedded profile, `make demo`, `make ui`): every step
  in the run's own process, one Python start per run (a run started by the UI or a sensor would otherwise
  import torch again in each step's process);
- "celery": `dagster-celery`'s executor; steps go to the queues of placement.py; the broker and result
  backend come from `LORA_PIPELINE_CELERY_BROKER` and `LORA_PIPELINE_CELERY_BACKEND` (deploy/cluster/);
- "k8s": `dagster-k8s`'s `k8s_job_executor`, one pod per step; its settings are deploy/k8s/executor.yaml.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import yaml

from lora_pipeline.core.settings import env_name, settings

K8S_EXECUTOR_FILE = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "executor.yaml"


def k8s_executor_config(path: Path = K8S_EXECUTOR_FILE) -> dict:
    """The `execution.config` section of deploy/k8s/executor.yaml: the k8s_job_executor's settings."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))["execution"]["config"]


def selected_executor() -> dg.ExecutorDefinition:
    """The executor `LORA_PIPELINE_EXECUTOR` names."""
    kind = settings().executor
    if kind == "default":
        return dg.in_process_executor
    if kind == "celery":
        from dagster_celery import celery_executor

        # Read from the environment when a run starts, in the run worker (dagster's StringSource): the URLs, which
        # may hold passwords, stay out of the job's snapshot.
        return celery_executor.configured({"broker": {"env": env_name("celery_broker")},
                                           "backend": {"env": env_name("celery_backend")}})
    from dagster_k8s import k8s_job_executor  # kind == "k8s": the settings allow no other value

    return k8s_job_executor.configured(k8s_executor_config())


@dg.definitions
def executor() -> dg.Definitions:
    return dg.Definitions(executor=selected_executor())
