"""The options issue 22 moved onto the fast path, on CPU: Prodigy (device-side state, captured), AdamW8bit (its step
after each replay) and text-encoder LoRA (the encoders' forward and backward in the captured step) give the plain
step's losses and LoRA tensors byte for byte over eager, recorded and replayed steps of one shape. On a CPU the
recorded step is called again (fastpath.CapturedStep), so these tests check the fast path's bookkeeping (static
buffers including the token ids, the gradients handed to an optimizer outside the graph), not the CUDA capture."""

from __future__ import annotations

import functools

import pytest
import torch

from lora_pipeline.core.models.loading import load_base_model
from lora_pipeline.core.training.inputs.encode import TextSource
from lora_pipeline.core.training.kohya.network import add_network, param_groups, trainable
from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline.core.training.recipe_checks import GRAPH_SAFE_OPTIMIZERS, fast_path_blockers
from lora_pipeline.core.training.seeds import Stream, torch_generator
from lora_pipeline.core.training.step.denoising import StepBatch
from lora_pipeline.core.training.step.fastpath import GraphedSteps, fast_path_choice
from lora_pipeline.core.training.step.loop import StepParts, make_accelerator, update
from lora_pipeline.core.training.step.optim import make_lr_scheduler, make_optimizer
from lora_pipeline_tests.helpers import tiny_recipe

CPU = torch.device("cpu")
STEPS = 3  # one shape: the eager step, the recording, a replay


Trained = tuple[list[torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]


def _train(tiny_model, recipe: Recipe, fast: bool) -> Trained:
    """STEPS steps of `recipe` built as run/setup.py builds them, on random latents: (losses, LoRA tensors before,
    LoRA tensors after)."""
    base = load_base_model(tiny_model("tiny-sd").parent, "tiny-sd", "sd15")
    add_network(base, recipe.network, 0)
    before = {name: p.detach().clone() for name, p in trainable(base).items()}
    unet = base.denoiser.train()
    train_text = not recipe.network_train_unet_only
    text = TextSource(base, torch.float32, CPU, train=train_text)
    optimizer = make_optimizer(recipe.optimizer_settings, recipe.schedule, param_groups(base, recipe.text_encoder_lr),
                               CPU)
    schedule = make_lr_scheduler(recipe.optimizer_settings, recipe.schedule, optimizer, STEPS)
    accelerator = make_accelerator(CPU, "no")
    unet, optimizer, schedule = accelerator.prepare(unet, optimizer, schedule)
    params = list(trainable(base).values())
    parts = StepParts(unet, base.noise_scheduler, recipe.noise, accelerator, optimizer, params,
                      text_encode=text.encode_ids if train_text else None,
                      optimizer_in_graph=recipe.optimizer in GRAPH_SAFE_OPTIMIZERS)
    step = GraphedSteps(parts, CPU) if fast else functools.partial(update, parts)
    losses = []
    for index in range(STEPS):
        generator = torch_generator(0, Stream.NOISE, index)
        latents = torch.randn(2, 4, 8, 8, generator=generator)
        conditioning = text.batch([f"trg, caption {index}", "trg"])
        if conditioning.hidden is None:
            ids = conditioning.ids
            batch = StepBatch(latents, None, input_ids=ids[0], input_ids_2=ids[1] if len(ids) > 1 else None)
        else:
            batch = StepBatch(latents, torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator))
        losses.append(step(batch, parts.draw(latents, generator)))
        schedule.step()
    if fast:
        assert len(step.captured) == 1  # the later steps were replays of the recording
    return losses, before, {name: p.detach().clone() for name, p in trainable(base).items()}


@pytest.mark.parametrize("options", [
    {"optimizer": "Prodigy", "learning_rate": 1.0, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 1},
    {"optimizer": "AdamW8bit", "learning_rate": 1e-2, "lr_scheduler": "cosine"},
    {"optimizer": "AdamW", "learning_rate": 1e-2, "lr_scheduler": "cosine", "network_train_unet_only": False,
     "text_encoder_lr": 5e-3},
], ids=["prodigy", "adamw8bit", "te-lora"])
def test_option_on_the_fast_path_trains_as_the_plain_step_byte_for_byte(tiny_model, options):
    recipe = tiny_recipe(**options)
    assert fast_path_blockers(recipe) == [] and fast_path_choice(recipe, torch.device("cuda"), 1)[0]
    plain_losses, before, plain_lora = _train(tiny_model, recipe, fast=False)
    fast_losses, _, fast_lora = _train(tiny_model, recipe, fast=True)
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, fast_losses, strict=True))
    assert all(torch.equal(plain_lora[name], fast_lora[name]) for name in plain_lora)
    moved = [name for name in plain_lora if not torch.equal(plain_lora[name], before[name])]
    assert any(not name.startswith("te") for name in moved)  # the U-Net's LoRA trained
    if not recipe.network_train_unet_only:  # and the text encoder's, inside the step
        assert any(name.startswith("te0.") for name in moved)


def test_the_optimizers_that_cannot_be_captured_still_refuse_the_fast_path():
    for name in ("Lion", "Adafactor", "AdamWScheduleFree"):
        (reason,) = fast_path_blockers(tiny_recipe(optimizer=name))
        assert reason.startswith(f"{name} reads values back to the host or keeps host state")
