"""The training step (noise, targets, min-SNR weighting) and the recipe switches of the loop."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.utils.checkpoint
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from lora_pipeline.core.training.recipe_groups import NoiseSettings
from lora_pipeline.core.training.step.denoising import StepBatch, apply_snr_weight, compute_loss
from lora_pipeline_tests.helpers import tiny_recipe, train


class ZeroUNet(torch.nn.Module):
    """Predicts zeros, so the loss is the mean square of the target the step chose."""

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        self.seen = (timestep, added_cond_kwargs)
        return SimpleNamespace(sample=torch.zeros_like(sample))


def _scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         prediction_type=prediction_type)


def _draws(seed: int, shape, offset: float):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=gen)
    if offset:
        noise = noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=gen)
    return noise, torch.randint(0, 1000, (shape[0],), generator=gen)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_targets_noise_or_velocity_with_kohya_noise_offset(prediction_type):
    scheduler = _scheduler(prediction_type)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = StepBatch(latents, torch.zeros(3, 77, 8))
    settings = NoiseSettings(noise_offset=0.1)
    loss = compute_loss(ZeroUNet(), scheduler, batch, torch.Generator().manual_seed(5), settings)
    noise, timesteps = _draws(5, latents.shape, 0.1)
    target = scheduler.get_velocity(latents, noise, timesteps) if prediction_type == "v_prediction" else noise
    torch.testing.assert_close(loss, target.pow(2).mean())


def test_min_snr_gamma_weights_like_kohya():
    scheduler = _scheduler()
    timesteps = torch.tensor([10, 500, 990])
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    ones = torch.ones(3)
    torch.testing.assert_close(apply_snr_weight(ones, timesteps, scheduler, 5.0, False), torch.clamp(snr, max=5) / snr)
    torch.testing.assert_close(apply_snr_weight(ones, timesteps, scheduler, 5.0, True),
                               torch.clamp(snr, max=5) / (snr + 1))
    assert apply_snr_weight(ones, timesteps, scheduler, 5.0, False)[0] < 1  # low t: high SNR, down-weighted


def test_sdxl_conditioning_reaches_the_unet():
    unet = ZeroUNet()
    embeds, ids = torch.ones(2, 32), torch.tensor([[64.0, 96, 0, 8, 64, 64]] * 2)
    batch = StepBatch(torch.zeros(2, 4, 8, 8), torch.zeros(2, 77, 64), text_embeds=embeds, time_ids=ids)
    compute_loss(unet, _scheduler(), batch, torch.Generator().manual_seed(0), NoiseSettings())
    assert unet.seen[1]["text_embeds"] is embeds and unet.seen[1]["time_ids"] is ids


def test_recipe_switches_train_and_checkpointing_is_on_and_changes_nothing(train_snapshot, monkeypatch):
    root = train_snapshot(n=3, repeats=2)
    recipe = tiny_recipe(epochs=1, optimizer="AdamW", learning_rate=1e-2, validation_split=0.0)
    checkpointed_blocks = []  # every U-Net block that ran under torch's activation checkpointing
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(function, *args, **kwargs):
        checkpointed_blocks.append(type(getattr(function, "__self__", function)).__name__)  # a block's bound forward
        return real_checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    plain, _ = train(root, recipe, "plain")
    assert checkpointed_blocks == []
    checkpointed, _ = train(root, replace(recipe, gradient_checkpointing=True), "checkpointed")
    assert len(checkpointed_blocks) >= checkpointed.total_steps and "ResnetBlock2D" in checkpointed_blocks
    torch.testing.assert_close(load_file(checkpointed.epochs[0]["file"]), load_file(plain.epochs[0]["file"]))

    switched = replace(recipe, cache_latents=False, shuffle_caption=False, min_snr_gamma=5.0, noise_offset=0.05,
                       enable_bucket=False, epochs=3, save_every_n_epochs=2)
    uncached, lines = train(root, switched, "uncached")
    assert all(torch.isfinite(torch.tensor(uncached.loss_history)))
    assert uncached.loss_history[:plain.total_steps] != plain.loss_history
    assert [e["epoch"] for e in uncached.epochs] == [2, 3]  # every 2nd epoch, and always the last
    assert len(lines) == 3  # but a progress line for every epoch
