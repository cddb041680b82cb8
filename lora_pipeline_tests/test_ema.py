"""Issue 25's EMA of the LoRA weights (`use_ema`, step/ema.py): the decay against diffusers' EMAModel, and one
EMA run on tiny-sd (two epochs of two steps) whose files hold the shadow, not the raw weights, resumed and
replayed on the fast path to the same bytes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.models.loading import load_base_model
from lora_pipeline.core.training.kohya.lora_file import read_lora_metadata
from lora_pipeline.core.training.kohya.network import add_network, kohya_state_dict
from lora_pipeline.core.training.recipe_groups import EmaSettings
from lora_pipeline.core.training.run.checkpoint import load_state
from lora_pipeline.core.training.step.ema import LoraEma
from lora_pipeline_tests.helpers import Crash, crash_after, tiny_recipe, train

pytestmark = pytest.mark.xdist_group("ema")

EMA = tiny_recipe(epochs=2, validation_split=0.0, optimizer="AdamW", learning_rate=5e-2, use_ema=True,
                  ema_decay=0.8, train_batch_size=2)


@pytest.fixture(scope="module")
def root(module_snapshot):
    return module_snapshot(n=4, repeats=1)


@pytest.fixture(scope="module")
def ema_run(root):
    return train(root, EMA, "ema")[0]


@pytest.mark.parametrize("settings", [
    EmaSettings(True, 0.995), EmaSettings(True, 0.9, ema_update_after_step=3),
    EmaSettings(True, 0.9999, ema_warmup=True, ema_power=0.75),
])
def test_the_decay_is_diffusers_ema_models(settings):
    reference = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=settings.ema_decay,
                         update_after_step=settings.ema_update_after_step, use_ema_warmup=settings.ema_warmup,
                         power=settings.ema_power)
    for step in range(1, 40):
        assert settings.decay(step) == pytest.approx(reference.get_decay(step), abs=1e-12)


def test_the_shadow_moves_toward_the_weights_by_one_minus_the_decay():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = LoraEma(EmaSettings(True, 0.5), {"p": param})
    with torch.no_grad():
        param.fill_(2.0)
    ema.update(1)  # the first update copies
    assert ema.shadow["p"].tolist() == [2.0, 2.0, 2.0]
    with torch.no_grad():
        param.fill_(4.0)
    ema.update(2)  # decay min(0.5, 2/11) = 2/11
    torch.testing.assert_close(ema.shadow["p"], torch.full((3,), 2.0 + 2.0 * 9 / 11))
    with ema.applied():
        assert torch.equal(param.detach(), ema.shadow["p"])
    assert param.detach().tolist() == [4.0, 4.0, 4.0]


def _file_tensors_of(root, recipe, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The kohya tensors a LoRA of `recipe` holding `weights` ({trainable name: tensor}) writes."""
    base = load_base_model(root.models, recipe.base_model, recipe.model_family, "cpu", torch.float32)
    add_network(base, recipe.network, recipe.seed, weights)
    return kohya_state_dict(base.denoiser, recipe.model_family, recipe.network_alpha)


def test_the_epoch_file_holds_the_shadow_not_the_raw_weights(root, ema_run):
    state = load_state(ema_run.out_dir)
    assert state.ema is not None and state.ema.keys() == state.lora.keys()
    ups = [n for n in state.lora if "lora_B" in n]
    assert any(not torch.equal(state.ema[n], state.lora[n]) for n in ups)  # the EMA lags the weights
    held = load_file(ema_run.epochs[-1]["file"])
    shadow, raw = _file_tensors_of(root, EMA, state.ema), _file_tensors_of(root, EMA, state.lora)
    assert held.keys() == shadow.keys() and all(torch.equal(held[k], shadow[k]) for k in held)
    assert any(not torch.equal(held[k], raw[k]) for k in held)
    meta = read_lora_metadata(Path(ema_run.epochs[-1]["file"]))
    assert (meta["ss_ema"], meta["ss_ema_decay"], meta["ss_ema_warmup"]) == ("True", "0.8", "False")
    params = EMA.resolved()  # the MLflow params of the run (trainer.py)
    assert (params["use_ema"], params["ema_decay"], params["ema_update_after_step"]) == (True, 0.8, 0)



def _bytes(result) -> list[bytes]:
    return [Path(e["file"]).read_bytes() for e in result.epochs]


def test_an_ema_run_resumes_to_the_same_bytes_and_replays_on_the_fast_path(root, ema_run):
    clean = ema_run


    with pytest.raises(Crash):
        train(root, EMA, "ema-resumed", log=crash_after(1))
    resumed, _ = train(root, EMA, "ema-resumed")
    assert resumed.resumed_from_epoch == 1 and resumed.loss_history == clean.loss_history
    assert _bytes(resumed) == _bytes(clean)
    fast, _ = train(root, replace(EMA, fast_path=True), "ema-fast")
    assert fast.fast_path and fast.loss_history == clean.loss_history
    for a, b in zip(clean.epochs, fast.epochs, strict=True):  # the headers differ by fast_path in the recipe
        ta, tb = load_file(a["file"]), load_file(b["file"])
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize(("fields", "expected"), [
    ({"ema_decay": 0.9}, "ema_decay needs use_ema: true"),
    ({"use_ema": True, "optimizer": "AdamWScheduleFree"}, "use_ema cannot be used with AdamWScheduleFree"),
])
def test_the_recipe_refuses_ema_settings_it_cannot_honour(tmp_path, fields, expected):
    from lora_pipeline.core.training.recipe import parse_recipe

    with pytest.raises(UserError, match=expected):
        parse_recipe({"base_model": "tiny-sd", **fields}, tmp_path / "r.yaml")


def test_ema_counts_in_the_recipe_hash_only_when_set():
    plain = tiny_recipe()
    assert replace(plain, use_ema=False).sha256 == plain.sha256
    assert replace(plain, use_ema=True).sha256 != plain.sha256
