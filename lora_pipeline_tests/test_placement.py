"""Placement of steps in the cluster profiles: Celery queues by op tag, and the Kubernetes pod of each step built
with dagster-k8s's own config classes from deploy/k8s/executor.yaml and the assets' `dagster-k8s/config` tags
(no cluster is needed: the specs are built, not applied)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import construct_dagster_k8s_job, get_user_defined_k8s_config

from lora_pipeline.defs.executor import k8s_executor_config
from lora_pipeline.defs.placement import K8S_TAG, QUEUE_TAG

GPU_ASSETS = {"lora_epochs", "evaluation_grid"}
CPU_ASSETS = {"source_batch", "dataset_snapshot", "caption_set", "dataset_report"}


@pytest.fixture(scope="module")
def op_tags() -> dict[str, dict[str, str]]:
    """Each asset's step tags, as the executor of the job that runs it sees them (text values)."""
    from lora_pipeline.definitions import defs

    tags = {}
    for job_name in ("register_batch_job", "build_dataset_job", "train_job", "evaluate_job"):
        for node in defs().resolve_job_def(job_name).nodes_in_topological_order:
            tags[node.name] = dict(node.tags)
    return tags


def step_job(tags: dict[str, str], step: str):
    """The V1Job that the k8s_job_executor would create for a step with these tags: the executor's container
    context from its config, merged with the step's `dagster-k8s/config` (as K8sStepHandler does)."""
    config = k8s_executor_config()
    context = K8sContainerContext(
        image_pull_policy=config["image_pull_policy"], env_vars=config["env_vars"], volumes=config["volumes"],
        volume_mounts=config["volume_mounts"],
    ).merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags)))
    # What the Helm chart's K8sRunLauncher contributes to a step's job config: the instance's ConfigMap.
    launcher = SimpleNamespace(job_image=None, dagster_home="/opt/dagster/dagster_home",
                               instance_config_map="dagster-instance", postgres_password_secret=None)
    job_config = context.get_k8s_job_config(config["job_image"], launcher)
    return construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_step"], f"dagster-step-{step}",
                                     user_defined_k8s_config=context.run_k8s_config)


def test_assets_are_routed_to_the_cpu_and_gpu_queues(op_tags) -> None:
    assert set(op_tags) >= GPU_ASSETS | CPU_ASSETS
    # Queue `cpu` or `gpu` after the deployment's prefix, read from the environment when the module defining the
    # asset is imported (empty by default; the cluster tests set one, and may import a module of this process)
    assert all(op_tags[a][QUEUE_TAG].endswith("gpu") for a in GPU_ASSETS)
    assert all(op_tags[a][QUEUE_TAG].endswith("cpu") for a in CPU_ASSETS)


@pytest.mark.parametrize("asset", sorted(GPU_ASSETS | CPU_ASSETS))
def test_each_step_pod_has_the_image_the_data_root_and_a_gpu_only_for_training(op_tags, asset) -> None:
    assert K8S_TAG in op_tags[asset]
    job = step_job(op_tags[asset], asset.replace("_", "-"))
    pod = job.spec.template.spec
    (container,) = pod.containers
    assert container.image == "registry.example.com/lora-pipeline:0.1.0"
    mounts = {m.mount_path: m.name for m in container.volume_mounts}
    assert mounts.get("/data") == "lora-data"
    volume = next(v for v in pod.volumes if v.name == "lora-data")
    assert volume.persistent_volume_claim.claim_name == "lora-data"
    env = {e.name: e.value for e in container.env}
    assert env["LORA_PIPELINE_DATA"] == "/data" and env["LORA_PIPELINE_EXECUTOR"] == "k8s"
    requests, limits = container.resources.requests, container.resources.limits or {}
    if asset in GPU_ASSETS:
        assert requests["nvidia.com/gpu"] == "1" and limits["nvidia.com/gpu"] == "1"
        assert any(t.key == "nvidia.com/gpu" for t in pod.tolerations)
    else:
        assert "nvidia.com/gpu" not in requests and "nvidia.com/gpu" not in limits
        assert requests["cpu"] and not pod.tolerations


@pytest.mark.parametrize(("kind", "executor"), [("default", "in_process"), ("celery", "celery"), ("k8s", "k8s")])
def test_the_executor_variable_picks_the_one_executor_of_every_job(monkeypatch, kind, executor) -> None:
    """In-process by default (a UI or sensor run imports torch once, not once per step); the code location
    loads with each choice (a second executor anywhere in the definitions would refuse to load)."""
    from lora_pipeline.definitions import defs

    monkeypatch.setenv("LORA_PIPELINE_EXECUTOR", kind)
    loaded = defs()
    for job_name in ("register_batch_job", "build_dataset_job", "train_job", "evaluate_job"):
        assert loaded.resolve_job_def(job_name).executor_def.name == executor
