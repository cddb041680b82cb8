"""Where each asset's step runs in the cluster profiles (deploy/): op tags read by dagster-celery and dagster-k8s.

The embedded default (one process, SQLite) ignores these tags. Under the Celery executor a step goes to the
queue named by `dagster-celery/queue`: dataset assets to `cpu`, training and evaluation to `gpu`. Under the
`k8s_job_executor` each step is a pod whose container takes the `dagster-k8s/config` of its op: dataset
assets request CPU and memory only, training and evaluation one `nvidia.com/gpu`.

`LORA_PIPELINE_QUEUE_PREFIX` (default empty) is put before both queue names, so two deployments (or two
test sessions) can share one broker without taking each other's tasks; every process of one deployment
(daemon, run workers, Celery workers) must see the same value.
"""

from __future__ import annotations

from typing import Any

from lora_pipeline.core.settings import settings

QUEUE_TAG = "dagster-celery/queue"
K8S_TAG = "dagster-k8s/config"
CPU, GPU = "cpu", "gpu"

_K8S_CPU: dict[str, Any] = {
    "container_config": {"resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "8Gi"}}},
}
_K8S_GPU: dict[str, Any] = {
    "container_config": {"resources": {
        "requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"},
        "limits": {"memory": "48Gi", "nvidia.com/gpu": "1"},
    }},
    # GPU nodes are usually tainted so that only pods asking for a GPU land there.
    "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
}


def queue_name(kind: str) -> str:
    """The Celery queue of `kind` ("cpu" or "gpu") in this deployment."""
    return settings().queue_prefix + kind


def op_tags(kind: str) -> dict[str, Any]:
    """The op tags of an asset that runs on a `kind` ("cpu" or "gpu") worker."""
    if kind not in (CPU, GPU):
        raise ValueError(f"unknown worker kind {kind!r}")
    return {QUEUE_TAG: queue_name(kind), K8S_TAG: _K8S_GPU if kind == GPU else _K8S_CPU}
