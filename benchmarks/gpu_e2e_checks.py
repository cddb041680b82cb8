"""The GPU drill's (gpu_e2e.py) checks of a trained model's outputs: every epoch file converts through diffusers'
kohya loader (a FLUX.1 file loads through FluxPipeline's `load_lora_weights`), the MLflow run finished with every
epoch file as an artifact, and the provenance chain is ok.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lora_pipeline.core.paths import DataRoot


def diffusers_tensors(family: str, path: Path) -> int:
    """How many tensors diffusers' kohya loader converts `path` into; RuntimeError if none or one is not finite."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    loader = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    state, _ = loader.lora_state_dict(str(path))
    if not state or not all(torch.isfinite(t).all() for t in state.values()):
        raise RuntimeError(f"{path}: diffusers' kohya loader gave no or non-finite weights")
    return len(state)


def diffusers_flux_layers(model_dir: Path, path: Path) -> int:
    """Load a kohya FLUX.1 file as a user does, FluxPipeline's `load_lora_weights` into a FluxTransformer2DModel
    of the model's config, on the CPU with its weights left uninitialised (only the LoRA's are read: seconds, and
    no GPU memory); the number of LoRA-carrying layers. RuntimeError if none or a LoRA weight is not finite."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(model_dir / "transformer"))
    transformer = transformer.to(torch.bfloat16).to_empty(device="cpu")
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.load_lora_weights(str(path), adapter_name="drill")
    layers = sum(isinstance(m, BaseTunerLayer) for m in transformer.modules())
    lora = [p for name, p in transformer.named_parameters() if ".drill." in name]
    if not layers or not lora or not all(torch.isfinite(p).all() for p in lora):
        raise RuntimeError(f"{path}: load_lora_weights placed no or non-finite LoRA weights ({layers} layers)")
    return layers


def check_outputs(root: DataRoot, family: str, base_model: str, trained: dict[str, Any]) -> dict[str, Any]:
    """Epoch files convert through diffusers' kohya loader; the MLflow run is complete; provenance is ok."""
    from mlflow.tracking import MlflowClient

    from lora_pipeline.core.lineage.provenance import trace_lora
    from lora_pipeline.core.models.loading import resolve_base_model
    from lora_pipeline.core.paths import mlflow_tracking_uri

    files = [Path(f) for f in trained["epoch_files"]]
    started = time.perf_counter()
    if family == "flux1":
        converted = {"diffusers_lora_layers": diffusers_flux_layers(Path(resolve_base_model(root.models, base_model)),
                                                                         files[-1])}
    else:
        converted = {"diffusers_tensors_per_file": [diffusers_tensors(family, path) for path in files][-1]}
    diffusers_seconds = time.perf_counter() - started
    client = MlflowClient(mlflow_tracking_uri(root.mlflow))
    run = client.get_run(trained["mlflow_run_id"])
    losses = client.get_metric_history(run.info.run_id, "loss")
    artifacts = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "epochs")}
    started = time.perf_counter()
    chain = trace_lora(root, files[-1])
    checks = {
        "epoch_files": len(files), **converted, "diffusers_seconds": diffusers_seconds,
        "provenance_seconds": time.perf_counter() - started,
        "mlflow_status": run.info.status, "mlflow_loss_points": len(losses),
        "mlflow_epoch_artifacts": sorted(artifacts) == sorted(p.name for p in files),
        "provenance": chain.status, "provenance_images": len(chain.images),
    }
    if run.info.status != "FINISHED" or not checks["mlflow_epoch_artifacts"] or chain.status != "ok":
        raise RuntimeError(f"{family}: output checks failed: {checks}")
    return checks
