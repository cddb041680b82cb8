"""The U-Nets' timestep sampling (`timestep_sampling` sigma / uniform, sigmoid, logit_normal; step/noise.py): the
drawn timesteps follow each mode's density inside [min_timestep, max_timestep); one-step runs on tiny-sd and
tiny-sdxl call the U-Net at the mode's timesteps, a narrow logit-normal reproduces the loss of the run pinned at its
timestep, and the header says the mode. The recipe's checks per family, each one line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.training.kohya.lora_file import read_lora_metadata
from lora_pipeline.core.training.recipe import parse_recipe
from lora_pipeline.core.training.recipe_groups import NoiseSettings
from lora_pipeline.core.training.step.noise import draw_timesteps
from lora_pipeline_tests.helpers import TINY, timesteps_seen, tiny_recipe, train

pytestmark = pytest.mark.xdist_group("timestep_sampling")

ONE_STEP = {"epochs": 1, "max_train_steps": 1, "validation_split": 0.0, "optimizer": "AdamW", "learning_rate": 1e-3}
DRAWS = 8192


def draw(**settings) -> torch.Tensor:
    return draw_timesteps(DRAWS, 1000, torch.Generator().manual_seed(0), NoiseSettings(**settings))


def middle(timesteps: torch.Tensor, low: int = 0, high: int = 1000) -> float:
    """The share of timesteps in the middle half of [low, high)."""
    quarter = (high - low) / 4
    return float(((timesteps >= low + quarter) & (timesteps < high - quarter)).double().mean())


def test_each_mode_draws_its_density_inside_the_bounds():
    uniform = draw()
    assert middle(uniform) == pytest.approx(0.5, abs=0.02)
    assert torch.equal(draw(timestep_sampling="uniform"), uniform)  # OneTrainer's name of kohya's draw
    logit_normal = draw(timestep_sampling="logit_normal")
    # sigmoid(N(0, 1)) is in [1/4, 3/4) when |N| < ln 3: 72.8% of the draws
    assert middle(logit_normal) == pytest.approx(math.erf(math.log(3) / math.sqrt(2)), abs=0.02)
    assert middle(draw(timestep_sampling="sigmoid", sigmoid_scale=0.5)) > 0.95  # narrower: more in the middle
    high = draw(timestep_sampling="logit_normal", logit_mean=2.0, logit_std=0.5)
    assert float(high.double().median()) == pytest.approx(1000 / (1 + math.exp(-2.0)), abs=5)  # 881
    for mode in ("sigmoid", "logit_normal"):
        bounded = draw(timestep_sampling=mode, min_timestep=200, max_timestep=400)
        assert int(bounded.min()) >= 200 and int(bounded.max()) < 400 and middle(bounded, 200, 400) > 0.7
        assert draw(timestep_sampling=mode, min_timestep=7, max_timestep=7).unique().tolist() == [7]


def recorded_run(root, out: str, **fields) -> tuple[float, torch.Tensor, dict[str, str]]:
    """A one-step run's first loss, the timesteps its U-Net was called with, and its file's header."""
    with timesteps_seen() as seen:
        result, _ = train(root, tiny_recipe(**ONE_STEP, **fields), out)
    return result.loss_history[0], torch.cat(seen), read_lora_metadata(Path(result.epochs[0]["file"]))


@pytest.fixture(scope="module")
def root(module_snapshot):
    return module_snapshot(n=4, repeats=1)


def test_a_narrow_logit_normal_trains_at_its_timestep_and_changes_the_loss_as_pinning_it_does(root):
    """sigmoid(N(m, 0.001)) with sigmoid(m) = 0.9505 puts every timestep at 950: the loss is the one of the run
    pinned there (min_timestep = max_timestep = 950; same noise, same timesteps), not the uniform run's."""
    share = 0.9505
    narrow = {"timestep_sampling": "logit_normal", "logit_mean": math.log(share / (1 - share)), "logit_std": 0.001}
    loss, timesteps, meta = recorded_run(root, "narrow", **narrow)
    assert timesteps.unique().tolist() == [950]
    pinned, pinned_timesteps, _ = recorded_run(root, "pinned", min_timestep=950, max_timestep=950)
    assert pinned_timesteps.unique().tolist() == [950]
    uniform, uniform_timesteps, uniform_meta = recorded_run(root, "uniform")
    assert loss == pytest.approx(pinned, rel=1e-6) and loss != pytest.approx(uniform, rel=1e-3)
    assert 950 not in uniform_timesteps.tolist()
    assert (meta["ss_timestep_sampling"], float(meta["ss_logit_mean"]), meta["ss_logit_std"]) == \
        ("logit_normal", narrow["logit_mean"], "0.001")
    assert "ss_timestep_sampling" not in uniform_meta  # the default writes the header it wrote before


def test_sigmoid_sampling_on_sdxl_stays_inside_the_bounds(root):
    _, timesteps, meta = recorded_run(root, "sdxl-sigmoid", base_model="tiny-sdxl", model_family="sdxl",
                                      timestep_sampling="sigmoid", sigmoid_scale=0.5, min_timestep=300,
                                      max_timestep=700)
    assert int(timesteps.min()) >= 300 and int(timesteps.max()) < 700
    assert (meta["ss_timestep_sampling"], meta["ss_sigmoid_scale"]) == ("sigmoid", "0.5")


def test_the_modes_each_family_takes_and_the_hash():
    assert tiny_recipe(timestep_sampling="uniform").sha256 == tiny_recipe().sha256  # draws what sigma draws
    assert tiny_recipe(timestep_sampling="logit_normal").sha256 != tiny_recipe().sha256
    flux = {"base_model": "tiny-flux", "model_family": "flux1"}
    assert tiny_recipe(**flux, timestep_sampling="uniform").sha256 != tiny_recipe(**flux).sha256
    tiny_recipe(**flux, timestep_sampling="shift", logit_mean=1.0, weighting_scheme="logit_normal")
    refused = {
        "timestep_sampling: shift is not a mode of an SD 1.x-style model": {"timestep_sampling": "shift"},
        "(FLUX.1's logit-normal density is weighting_scheme: logit_normal)": {**flux,
                                                                              "timestep_sampling": "logit_normal"},
        "sigmoid_scale is read only by timestep_sampling: sigmoid": {"timestep_sampling": "logit_normal",
                                                                      "sigmoid_scale": 2.0},
        "logit_std is read only by timestep_sampling: logit_normal": {"logit_std": 2.0},
    }
    for needle, fields in refused.items():
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")) as caught:
            parse_recipe({**TINY, **fields}, Path("tiny.yaml"))
        assert "\n" not in str(caught.value)
