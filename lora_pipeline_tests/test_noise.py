"""kohya's noise options, schedules and optimizers on their own (the training runs are in test_network.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from lora_pipeline.core.training.recipe_groups import NoiseSettings
from lora_pipeline.core.training.step.noise import (
    debiased_weight,
    draw_noise,
    training_scheduler,
    zero_terminal_snr_betas,
)
from lora_pipeline.core.training.step.optim import averaged_weights, make_lr_scheduler, make_optimizer
from lora_pipeline_tests.helpers import tiny_recipe

SHAPE = (2, 4, 16, 16)


def _draw(**settings):
    return draw_noise(SHAPE, 1000, torch.Generator().manual_seed(3), NoiseSettings(**settings))


def test_multires_and_input_perturbation_noise():
    plain, pyramid = _draw(), _draw(multires_noise_iterations=4, multires_noise_discount=0.8)
    assert torch.equal(plain.noise, plain.noised) and not torch.equal(plain.noise, pyramid.noise)
    assert abs(pyramid.noise.std().item() - 1.0) < 1e-5  # scaled back to unit deviation, as kohya
    # low frequencies: neighbouring pixels of pyramid noise correlate, plain noise's do not
    def neighbours(x):
        return torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1].item()
    assert neighbours(pyramid.noise) > 0.2 and abs(neighbours(plain.noise)) < 0.1
    perturbed = _draw(ip_noise_gamma=0.1)
    assert torch.equal(perturbed.noise, plain.noise) and torch.equal(perturbed.timesteps, plain.timesteps)
    extra = (perturbed.noised - perturbed.noise) / 0.1  # the target stays `noise`, the input gets gamma * randn
    assert abs(extra.std().item() - 1.0) < 0.1 and abs(torch.corrcoef(torch.stack(
        [extra.flatten(), plain.noise.flatten()]))[0, 1].item()) < 0.1


def test_zero_terminal_snr_v_prediction_and_debiased_weights():
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    fixed = training_scheduler(scheduler, tiny_recipe(v_parameterization=True, zero_terminal_snr=True).noise)
    assert fixed.config.prediction_type == "v_prediction" and scheduler.config.prediction_type == "epsilon"
    assert fixed.alphas_cumprod[-1].item() < 1e-10 < scheduler.alphas_cumprod[-1].item()
    torch.testing.assert_close(fixed.alphas_cumprod[0], scheduler.alphas_cumprod[0])
    assert torch.equal(zero_terminal_snr_betas(scheduler.betas), fixed.betas)
    assert training_scheduler(scheduler, tiny_recipe().noise).config.prediction_type == "epsilon"
    timesteps = torch.tensor([10, 500, 999])
    weighted = debiased_weight(torch.ones(3), timesteps, fixed)
    snr = compute_snr(fixed, timesteps).clamp(1e-3, 1000)
    torch.testing.assert_close(weighted, 1 / snr.sqrt())
    assert torch.isfinite(weighted).all() and weighted[0] < weighted[1] < weighted[2]


def _lrs(recipe, steps: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = make_optimizer(recipe.optimizer_settings, recipe.schedule, [param], torch.device("cpu"))
    schedule = make_lr_scheduler(recipe.optimizer_settings, recipe.schedule, optimizer, steps)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones(2)
        optimizer.step()
        schedule.step()
    return out


def test_cosine_with_restarts_and_polynomial_schedules():
    restarts = _lrs(tiny_recipe(optimizer="AdamW", learning_rate=1.0, lr_scheduler="cosine_with_restarts",
                                lr_scheduler_num_cycles=2), 10)
    assert restarts[0] == restarts[5] == 1.0 and restarts[4] < 0.2 and restarts[9] < 0.2  # two hard restarts
    poly = _lrs(tiny_recipe(optimizer="AdamW", learning_rate=1.0, lr_scheduler="polynomial",
                            lr_scheduler_power=2.0), 10)
    assert poly == pytest.approx([(1 - t / 10) ** 2 * (1 - 1e-7) + 1e-7 for t in range(10)], abs=1e-6)


@pytest.mark.parametrize("name", ["Lion", "AdamWScheduleFree"])
def test_lion_and_schedule_free_step(name):
    param = torch.nn.Parameter(torch.zeros(3))
    recipe = tiny_recipe(optimizer=name, learning_rate=0.1, weight_decay=0.0)
    optimizer = make_optimizer(recipe.optimizer_settings, recipe.schedule, [param], torch.device("cpu"))
    for _ in range(1 if name == "Lion" else 3):
        param.grad = torch.tensor([1.0, -2.0, 0.0])
        optimizer.step()
    if name == "Lion":  # sign of the interpolated momentum times lr
        assert param.tolist() == pytest.approx([-0.1, 0.1, 0.0])
    else:  # saving and sampling switch to the averaged weights (optim.averaged_weights), then back
        training = param.detach().clone()
        assert training[0] < 0 < training[1]
        with averaged_weights(optimizer):
            assert not torch.equal(param, training) and param[0] < 0 < param[1]
        torch.testing.assert_close(param.detach(), training)
