"""Issue 25's first group of trainer options, kohya's names: min_timestep / max_timestep, loss_type with the Huber
threshold (huber_schedule, huber_c, huber_scale) and optimizer_args. Trained for real on tiny-sd (one shared run
with every option, replayed on the fast path and resumed, and one-step runs per loss type) and tiny-sdxl (one-step
runs); the loss functions against kohya's formulas; FLUX.1's flow loss with Huber; the recipe's refusals, each one
line."""

from __future__ import annotations

import inspect
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from lora_pipeline.core.models.loading import load_base_model
from lora_pipeline.core.training.kohya.lora_file import read_lora_metadata
from lora_pipeline.core.training.kohya.network import add_network
from lora_pipeline.core.training.optimizer_args import OPTIMIZER_ARGS
from lora_pipeline.core.training.recipe import parse_recipe
from lora_pipeline.core.training.recipe_groups import FlowSettings, NoiseSettings
from lora_pipeline.core.training.run.checkpoint import load_state
from lora_pipeline.core.training.run.tracking import TrainingTracker
from lora_pipeline.core.training.run.trainer import train_lora
from lora_pipeline.core.training.step.dadapt import DAdaptAdamW
from lora_pipeline.core.training.step.flux_step import RectifiedFlow
from lora_pipeline.core.training.step.loss import conditional_loss, huber_threshold
from lora_pipeline.core.training.step.noise import draw_timesteps
from lora_pipeline.core.training.step.optim import make_optimizer
from lora_pipeline_tests.helpers import TINY, Crash, crash_after, recipe_refusal, timesteps_seen, tiny_recipe, train

pytestmark = pytest.mark.xdist_group("training_options")

OPTIONS = tiny_recipe(
    epochs=2, validation_split=0.0, optimizer="AdamW", learning_rate=1e-2, min_timestep=600, max_timestep=620,
    loss_type="huber", huber_schedule="exponential", huber_c=0.2,
    optimizer_args={"betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.02, "amsgrad": True},
)
ONE_STEP = {"epochs": 1, "max_train_steps": 1, "validation_split": 0.0, "optimizer": "AdamW", "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def root(module_snapshot):
    return module_snapshot(n=4, repeats=1)


@pytest.fixture(scope="module")
def options_run(root):
    """The OPTIONS run, with the timesteps the U-Net was called with (its forward wrapped, nothing replaced)."""
    with timesteps_seen() as seen:
        result = train_lora(root, "train-v1", OPTIONS, out_dir=root.root / "options", device="cpu",
                            provenance={"code_commit": "test-commit"}, tracker=TrainingTracker(root.mlflow),
                            log=lambda line: None)
    return result, torch.cat(seen)


def test_min_and_max_timestep_bound_the_drawn_timesteps(options_run):
    _, timesteps = options_run
    assert len(timesteps) >= 4 and int(timesteps.min()) >= 600 and int(timesteps.max()) < 620
    assert len(set(timesteps.tolist())) > 1  # drawn, not fixed
    generator = torch.Generator().manual_seed(0)
    assert draw_timesteps(3, 1000, generator, NoiseSettings(min_timestep=7, max_timestep=7)).tolist() == [7, 7, 7]
    unbounded = draw_timesteps(4096, 1000, torch.Generator().manual_seed(0), NoiseSettings())
    assert int(unbounded.min()) < 50 and int(unbounded.max()) > 950
    # the default bounds draw exactly what the unbounded draw always drew (old runs reproduce)
    assert torch.equal(unbounded, torch.randint(0, 1000, (4096,), generator=torch.Generator().manual_seed(0)))


def test_the_options_are_in_the_header_as_kohya_writes_them(options_run):
    result, _ = options_run
    meta = read_lora_metadata(Path(result.epochs[-1]["file"]))
    assert meta["ss_loss_type"] == "huber" and meta["ss_huber_schedule"] == "exponential"
    assert meta["ss_huber_c"] == "0.2" and meta["ss_huber_scale"] == "1.0"
    assert meta["modelspec.timestep_range"] == "600,620"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.02,betas=(0.8, 0.95),eps=1e-06,amsgrad=True)"


def test_optimizer_args_reach_the_optimizer_of_the_run(options_run):
    result, _ = options_run
    (group,) = load_state(result.out_dir).optimizer["param_groups"]
    assert tuple(group["betas"]) == (0.8, 0.95) and group["eps"] == 1e-6 and group["weight_decay"] == 0.02
    assert group["amsgrad"] is True


def test_the_options_are_mlflow_params(root, options_run):
    result, _ = options_run
    params = TrainingTracker(root.mlflow).client.get_run(result.mlflow_run_id).data.params
    assert (params["min_timestep"], params["max_timestep"], params["loss_type"]) == ("600", "620", "huber")
    assert (params["huber_schedule"], params["huber_c"], params["huber_scale"]) == ("exponential", "0.2", "1.0")
    assert params["optimizer_args"] == '{"amsgrad":true,"betas":[0.8,0.95],"eps":1e-06,"weight_decay":0.02}'



def test_a_run_with_the_options_resumes_to_the_same_files(root, options_run):
    clean, _ = options_run


    with pytest.raises(Crash):
        train(root, OPTIONS, "options-resumed", log=crash_after(1))
    resumed, _ = train(root, OPTIONS, "options-resumed")
    assert resumed.resumed_from_epoch == 1 and resumed.loss_history == clean.loss_history
    for a, b in zip(clean.epochs, resumed.epochs, strict=True):
        assert Path(a["file"]).name == Path(b["file"]).name
        ta, tb = load_file(a["file"]), load_file(b["file"])
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_the_fast_path_trains_the_options_byte_identically(root, options_run):
    plain, _ = options_run
    fast, _ = train(root, replace(OPTIONS, fast_path=True), "options-fast")
    assert fast.fast_path and fast.loss_history == plain.loss_history
    for a, b in zip(plain.epochs, fast.epochs, strict=True):
        ta, tb = load_file(a["file"]), load_file(b["file"])
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_huber_on_sdxl_is_the_mse_for_small_residuals_and_less_for_large(root):
    sdxl = {**ONE_STEP, "base_model": "tiny-sdxl", "model_family": "sdxl", "min_timestep": 100, "max_timestep": 900}
    l2 = train(root, tiny_recipe(**sdxl), "sdxl-l2")[0].loss_history[0]
    constant = {"loss_type": "huber", "huber_schedule": "constant", "huber_c": 1.0, "huber_scale": 100.0}
    wide = train(root, tiny_recipe(**sdxl, **constant), "sdxl-huber-wide")[0].loss_history[0]
    snr = train(root, tiny_recipe(**sdxl, loss_type="huber"), "sdxl-huber-snr")[0].loss_history[0]
    assert wide == pytest.approx(l2, rel=1e-3) and snr < 0.9 * l2


def test_each_loss_type_changes_the_first_step_loss_as_stated(root):
    """The first step's loss, before any update, on the same images, noise and timesteps."""
    def first_loss(name: str, **loss) -> float:
        result, _ = train(root, tiny_recipe(**ONE_STEP, **loss), f"loss-{name}")
        return result.loss_history[0]

    l2, l1 = first_loss("l2"), first_loss("l1", loss_type="l1")
    wide = first_loss("huber-wide", loss_type="huber", huber_schedule="constant", huber_c=1.0, huber_scale=100.0)
    snr = first_loss("huber-snr", loss_type="huber")
    smooth = first_loss("smooth-narrow", loss_type="smooth_l1", huber_schedule="constant", huber_c=0.001)
    assert l1 != pytest.approx(l2, rel=0.05)
    assert wide == pytest.approx(l2, rel=1e-3)  # residuals far below c: Huber is the MSE
    assert snr < 0.9 * l2  # residuals about c (0.1 to 1 by the SNR schedule): large ones count linearly
    assert smooth == pytest.approx(2 * l1, rel=0.01)  # residuals far above c: smooth_l1 is 2|r|


def test_huber_is_kohyas_formula_and_the_mse_for_small_residuals():
    pred = torch.tensor([[0.0, 1e-3, -2e-3, 3.0]], dtype=torch.float64).view(1, 4, 1, 1)  # float64: sqrt(r^2 + c^2)
    target = torch.zeros_like(pred)  # - c cancels to r^2 / 2c, which float32 keeps to 3% only at r = 1e-3
    c = torch.tensor([0.5], dtype=torch.float64)
    huber = conditional_loss(pred, target, "huber", c)
    kohya = 2 * c * (torch.sqrt((pred - target) ** 2 + c**2) - c)  # train_util.conditional_loss
    assert torch.allclose(huber, kohya.view_as(huber))
    mse = conditional_loss(pred, target, "l2", None)
    assert torch.allclose(huber[:, :3], mse[:, :3], rtol=1e-4, atol=1e-12)  # small residuals: r^2
    assert huber[0, 3] < 0.5 * mse[0, 3]  # large: linear in r (2c|r| - ...)
    smooth = conditional_loss(pred, target, "smooth_l1", c)
    assert torch.allclose(smooth, huber / 0.5)


def test_the_huber_threshold_per_timestep_is_kohyas():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    t = torch.tensor([0, 250, 999])
    snr = huber_threshold(NoiseSettings(loss_type="huber"), t, 1000, scheduler.alphas_cumprod)
    alpha_bar = scheduler.alphas_cumprod[t]
    sigmas = ((1 - alpha_bar) / alpha_bar) ** 0.5
    assert torch.allclose(snr, (1 - 0.1) / (1 + sigmas) ** 2 + 0.1)  # get_huber_threshold_if_needed
    assert snr[0] > 0.98 and snr[2] < 0.11  # about 1 at t = 0, huber_c at the end
    exponential = huber_threshold(NoiseSettings(loss_type="smooth_l1", huber_schedule="exponential", huber_c=0.2,
                                                huber_scale=2.0), t, 1000, None)
    assert torch.allclose(exponential, torch.exp(math.log(0.2) / 1000 * t.float()) * 2.0)
    constant = huber_threshold(NoiseSettings(loss_type="huber", huber_schedule="constant", huber_c=0.3,
                                             huber_scale=2.0), t, 1000, None)
    assert torch.allclose(constant, torch.full((3,), 0.6))
    assert huber_threshold(NoiseSettings(), t, 1000, None) is None


def test_flux_takes_huber_as_kohyas_train_network_does(tiny_model):
    base = load_base_model(tiny_model("tiny-flux").parent, "tiny-flux", "flux1")
    add_network(base, tiny_recipe(base_model="tiny-flux", model_family="flux1").network, 0)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    text, pooled = torch.randn(2, 7, 32, generator=generator), torch.randn(2, 32, generator=generator)

    def loss(**settings) -> float:
        flow = RectifiedFlow.of(FlowSettings(), base.denoiser, NoiseSettings(**settings))
        noise, sigmas = flow.draw(tuple(latents.shape), torch.Generator().manual_seed(1))
        with torch.no_grad():
            return float(flow.loss(base.denoiser, latents, noise, sigmas, text, pooled))

    l2 = loss()
    assert loss(loss_type="huber", huber_schedule="constant", huber_c=1.0, huber_scale=100.0) == pytest.approx(
        l2, rel=1e-3)
    assert loss(loss_type="huber", huber_schedule="exponential") < 0.9 * l2


@pytest.mark.parametrize("name", sorted(OPTIMIZER_ARGS))
def test_every_listed_optimizer_argument_is_one_the_constructor_takes(name):
    import bitsandbytes
    import lion_pytorch
    import prodigyopt
    import schedulefree
    from transformers.optimization import Adafactor

    from lora_pipeline.core.training.step.prodigy import Prodigy

    if name == "Prodigy":  # the device-side Prodigy takes every key kohya passes to prodigyopt's
        assert set(OPTIMIZER_ARGS[name]) <= set(inspect.signature(Prodigy.__init__).parameters)
    classes = {"DAdaptAdamW": DAdaptAdamW, "AdamW": torch.optim.AdamW, "AdamW8bit": bitsandbytes.optim.AdamW8bit,
               "Prodigy": prodigyopt.Prodigy, "Lion": lion_pytorch.Lion, "Adafactor": Adafactor,
               "AdamWScheduleFree": schedulefree.AdamWScheduleFree}
    assert set(OPTIMIZER_ARGS[name]) <= set(inspect.signature(classes[name].__init__).parameters)


def test_prodigy_takes_kohyas_d_adaptation_arguments():
    recipe = tiny_recipe(optimizer="Prodigy", optimizer_args={
        "betas": [0.9, 0.99], "weight_decay": 0.01, "eps": 1e-8, "decouple": True, "use_bias_correction": True,
        "safeguard_warmup": True, "d_coef": 0.5})
    optimizer = make_optimizer(recipe.optimizer_settings, recipe.schedule, [torch.nn.Parameter(torch.zeros(3))],
                               torch.device("cpu"))
    group = optimizer.param_groups[0]
    assert (group["betas"], group["weight_decay"], group["eps"], group["d_coef"]) == ((0.9, 0.99), 0.01, 1e-8, 0.5)
    assert group["decouple"] and group["use_bias_correction"] and group["safeguard_warmup"]


def test_the_recipe_refuses_what_cannot_train_in_one_line(tmp_path):
    assert "AdamW takes no argument 'd_coef'" in recipe_refusal(tmp_path, optimizer="AdamW",
                                                               optimizer_args={"d_coef": 1.0})
    assert "'lr' is the recipe field learning_rate" in recipe_refusal(tmp_path, optimizer_args={"lr": 1e-3})
    assert "min_timestep must not be larger than max_timestep" in recipe_refusal(tmp_path, min_timestep=500,
                                                                           max_timestep=400)
    flux = {"base_model": "tiny-flux", "model_family": "flux1"}
    assert "min_timestep is not an option of a FLUX.1 model" in recipe_refusal(tmp_path, **flux, min_timestep=100)
    assert "huber_schedule: snr needs a DDPM noise schedule" in recipe_refusal(tmp_path, **flux, loss_type="huber")
    assert parse_recipe({**TINY, **flux, "name": "r", "loss_type": "huber", "huber_schedule": "constant"},
                        tmp_path / "r.yaml").loss_type == "huber"


def test_unset_options_keep_the_hash_and_each_set_one_changes_it():
    recipe = tiny_recipe()
    changes = {"min_timestep": 10, "max_timestep": 900, "loss_type": "huber", "huber_schedule": "constant",
               "huber_c": 0.2, "huber_scale": 2.0, "optimizer_args": {"betas": [0.9, 0.99]}}
    hashes = {replace(recipe, **{name: value}).sha256 for name, value in changes.items()}
    assert recipe.sha256 not in hashes and len(hashes) == len(changes)
    assert replace(recipe, loss_type="l2", optimizer_args=None, min_timestep=None).sha256 == recipe.sha256
