"""Samples while training (kohya's sample_every_n_epochs): the recipe's sample prompts rendered with the LoRA as
it stands after an epoch, at weight 1.0, one strip per epoch, so a bad run can be stopped early.

The stock diffusers pipeline is built once around the modules being trained (models.sampling.load_pipeline:
the peft adapters are live in them at scale 1.0), and every image of prompt i starts from the noise of
`sample_seed + i`, as in the evaluation grid, so strips of different epochs differ only by the LoRA. Frozen
modules that training moved off the GPU come back for the render and leave again. Strips are written to
`<out_dir>/samples/<version>-<recipe>-eNNN.png` (atomically) and logged to MLflow as images (key `samples`,
step = epoch); `evaluation_grid` still renders the full epoch x weight grid afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from lora_pipeline.core.models.loading import BaseModel
from lora_pipeline.core.models.sampling import SamplingSettings, load_pipeline, sample, save_png

SAMPLES_DIR = "samples"


def strip_path(out_dir: Path, version: str, recipe: str, epoch: int) -> Path:
    return out_dir / SAMPLES_DIR / f"{version}-{recipe}-e{epoch:03d}.png"


def latest_strip(out_dir: Path, version: str, recipe: str, last_epoch: int) -> Path | None:
    """The newest strip written so far (by this run or the run it resumed), None without any."""
    strips = [strip_path(out_dir, version, recipe, epoch) for epoch in range(last_epoch, 0, -1)]
    return next((path for path in strips if path.is_file()), None)


def strip_image(images: np.ndarray) -> Image.Image:
    """uint8 [prompt, H, W, 3] side by side."""
    return Image.fromarray(np.concatenate(list(images), axis=1))


@contextmanager
def _on_device(modules: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    homes = [next(m.parameters()).device for m in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(modules, homes, strict=True):
            module.to(home)


class SampleRenderer:
    """Renders the sample strip of the modules as they are now; the pipeline is made on first use, v-prediction
    when the LoRA trains it (`v_prediction`)."""

    def __init__(self, base: BaseModel, settings: SamplingSettings, v_prediction: bool, device: torch.device,
                 dtype: torch.dtype):
        self.base, self.settings, self.v_prediction = base, settings, v_prediction
        self.device, self.dtype = device, dtype
        self._pipe: DiffusionPipeline | None = None

    def _pipeline(self) -> DiffusionPipeline:
        if self._pipe is None:
            # the VAE keeps the dtype training gave it; v-prediction as the LoRA was trained
            self._pipe = load_pipeline(self.base, self.base.vae.dtype, v_prediction=self.v_prediction)
        return self._pipe

    def render(self, path: Path) -> Path:
        """Write the strip of every sample prompt at LoRA weight 1.0 to `path`."""
        pipe = self._pipeline()
        frozen = [self.base.vae, *self.base.text_encoders]
        mixed = self.device.type == "cuda" and self.dtype != torch.float32  # as the training step runs
        with _on_device(frozen, self.device), torch.autocast(self.device.type, dtype=self.dtype, enabled=mixed):
            images = sample(pipe, self.settings, options=self.base.pipeline_call_options)
        save_png(strip_image(images), path)
        return path
