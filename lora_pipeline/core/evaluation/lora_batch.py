"""The evaluation grid's sampling with fewer, larger pipeline calls: an epoch's LoRA at several weights in one
call (`sample_weights`), and one adapter whose weights are refilled from each epoch's file (`epoch_adapter`).

Classifier-free guidance is already batched by the stock pipelines (the unconditional and the conditional half of
each call go through the denoiser as one batch of 2N), and `sample` already renders all prompts of a weight in
one call. What was left were the epoch x weight calls, each a separate denoising loop of small batches (on a GPU
bound by kernel launches), and a `load_lora_weights` per epoch file (key conversion and new peft modules).

Per-image weights: while `sample_weights` runs, the adapter's scale is 1 in every LoRA layer and a forward hook
on the layer's `lora_B` multiplies image i's LoRA output by weight_i x the layer's alpha/rank, in float32 and
rounded once to the output's dtype: the same value as peft's `lora_B(lora_A(x)) * scaling` with the scalar
scaling of `set_adapters(weight_i)`. A batch of N images (the text encoders) takes the N weights, a batch of 2N
(the denoiser under guidance: unconditional half, then conditional half, both in image order) takes them twice.
So an image differs from the one rendered alone only where kernels compute a larger batch differently (on a CPU
the grid is byte-identical, test_sampling.py). The SD1.5 and SDXL pipelines only: FLUX.1's T5 LoRA is not a peft
layer here (t5_lora.py), so its weights keep one call each.

`epoch_adapter` loads the first file through `load_lora_weights` (as a user does); each later file whose kohya
keys are the same (the same run: same modules, ranks and alphas) is copied into the loaded adapter's weights in
place, so no module is made again. Any other file (another layout, FLUX.1's fused one) is loaded anew.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from diffusers import DiffusionPipeline

from lora_pipeline.core.models.loading import BaseModel
from lora_pipeline.core.models.sampling import SamplingSettings, loaded_lora, sample, set_lora_weight
from lora_pipeline.core.training.kohya.network import kohya_state_dict

BATCHED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
MAX_BATCH_PIXELS = 32 * 512 * 512  # images of one call at most: 32 at 512 px, 8 at 1024 px (before guidance's 2x)


def _adapter_layers(pipe: DiffusionPipeline, adapter: str) -> list[Any]:
    """Every layer of `adapter` in the pipeline's denoiser and text encoders (LoRA, LoHa or LoKr)."""
    from lora_pipeline.core.models.dora import adapter_modules

    models = [getattr(pipe, name, None) for name in ("unet", "transformer", "text_encoder", "text_encoder_2")]
    return [module for model in models if model is not None for _, module in adapter_modules(model, adapter)]


def _plain_lora(pipe: DiffusionPipeline, adapter: str) -> bool:
    """Whether every layer of `adapter` is a plain LoRA, whose output the per-image hook can scale: a DoRA layer's
    weight is not linear in its LoRA's scale, and LoHa / LoKr layers have no `lora_B` (those take a call a weight)."""
    layers = _adapter_layers(pipe, adapter)
    return bool(layers) and all(hasattr(layer, "lora_B") and not layer.use_dora.get(adapter) for layer in layers)


@contextmanager
def per_image_weights(pipe: DiffusionPipeline, adapter: str, weights: Sequence[float]) -> Iterator[None]:
    """While open, image i of each call is rendered with `adapter` at `weights[i]` (module docstring)."""
    set_lora_weight(pipe, adapter, 1.0)
    layers = _adapter_layers(pipe, adapter)  # plain LoRA layers here (sample_weights checks _plain_lora)
    scalings = [float(layer.scaling[adapter]) for layer in layers]
    handles = []

    def hook_of(scaling: float) -> Callable[[torch.nn.Module, Any, torch.Tensor], torch.Tensor]:
        factors: dict[tuple[int, torch.device], torch.Tensor] = {}

        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            n = output.shape[0]
            if n not in (len(weights), 2 * len(weights)):
                raise RuntimeError(f"a LoRA layer saw a batch of {n}, not {len(weights)} images (or twice that)")
            key = (n, output.device)
            if key not in factors:
                values = [w * scaling for w in weights] * (n // len(weights))
                factors[key] = torch.tensor(values, dtype=torch.float32, device=output.device)
            factor = factors[key].reshape(n, *[1] * (output.ndim - 1))
            return (output.float() * factor).to(output.dtype)

        return hook

    try:
        for layer, scaling in zip(layers, scalings, strict=True):
            layer.scaling[adapter] = 1.0
            handles.append(layer.lora_B[adapter].register_forward_hook(hook_of(scaling)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, scaling in zip(layers, scalings, strict=True):
            layer.scaling[adapter] = scaling


def weight_chunks(weights: Sequence[float], prompts: int, resolution: int) -> list[list[float]]:
    """`weights` cut into runs of calls of at most MAX_BATCH_PIXELS (at least one weight a call)."""
    per_call = max(1, MAX_BATCH_PIXELS // (resolution * resolution * max(1, prompts)))
    return [list(weights[i:i + per_call]) for i in range(0, len(weights), per_call)]


@torch.no_grad()
def sample_weights(pipe: DiffusionPipeline, base: BaseModel, settings: SamplingSettings, adapter: str,
                   weights: Sequence[float], options: Mapping[str, Any] | None = None) -> np.ndarray:
    """uint8 [weight, prompt, H, W, 3]: every sample prompt at every weight of `adapter`, as many per call as
    MAX_BATCH_PIXELS allows (SD1.5, SDXL; one call per weight otherwise). Image (w, i) starts from the noise of
    seed + i, as `sample` renders it."""
    count = len(settings.prompts)
    if base.architecture.pipeline not in BATCHED_PIPELINES or not _plain_lora(pipe, adapter):
        return np.stack([sample(pipe, settings, adapter, w, options) for w in weights])
    out = []
    for chunk in weight_chunks(weights, count, settings.resolution):
        per_image = [w for w in chunk for _ in range(count)]
        with per_image_weights(pipe, adapter, per_image):
            images = sample(pipe, settings, options=options, copies=len(chunk))
        out.append(images.reshape(len(chunk), count, *images.shape[1:]))
    return np.concatenate(out)


def _live_weights(pipe: DiffusionPipeline, base: BaseModel, adapter: str) -> dict[str, torch.Tensor]:
    """{kohya key: the loaded adapter's own parameter (or alpha value)}; empty where the layout joins tensors."""
    if base.architecture.kohya_layout != "per_module":
        return {}
    encoders = [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e]
    set_lora_weight(pipe, adapter, 1.0)
    try:
        return kohya_state_dict(pipe.unet, base.architecture.name, adapter_name=adapter, text_encoders=encoders,
                                copy=lambda t: t)
    except ValueError:  # a scale that is not alpha/rank: load each file anew
        return {}


def _refill(live: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> bool:
    """Copy a file's weights into the loaded adapter, if it has exactly its keys and alphas (else False)."""
    if set(live) != set(tensors):
        return False
    for key, value in live.items():
        if key.endswith(".alpha"):
            if not math.isclose(float(value), float(tensors[key])):
                return False
        elif not isinstance(value, torch.nn.Parameter) or value.shape != tensors[key].shape:
            return False
    with torch.no_grad():
        for key, value in live.items():
            if not key.endswith(".alpha"):
                value.copy_(tensors[key])
    return True


@contextmanager
def epoch_adapter(pipe: DiffusionPipeline, base: BaseModel) -> Iterator[Callable[[Path, int], str]]:
    """A function (file, epoch) -> adapter name that puts that epoch's LoRA in the pipeline (module docstring);
    the adapter is deleted when the block ends."""
    with ExitStack() as stack:
        live: dict[str, torch.Tensor] = {}
        name = ""

        def load(path: Path, epoch: int) -> str:
            nonlocal live, name
            if live and _refill(live, safetensors.torch.load_file(str(path))):
                return name
            stack.close()  # the previous epoch's adapter goes
            name = stack.enter_context(loaded_lora(pipe, path, epoch, base.architecture))
            live = _live_weights(pipe, base, name)
            return name

        yield load
