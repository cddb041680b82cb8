"""Training recipes: strict types, ranges (no NaN, no 8-megapixel squares), one-line errors, unchanged hashes."""

from __future__ import annotations

import time
from dataclasses import fields, replace

import pytest
import yaml

from lora_pipeline.core.datasets.buckets import DEFAULT_BUCKETS, BucketSettings
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.schema import later_fields
from lora_pipeline.core.training.recipe import Recipe, load_recipe
from lora_pipeline_tests.helpers import committed_data

REPO_RECIPES = committed_data() / "recipes"
# recipe_sha256 of the committed samples as the hand-written parser computed them (LoRA files and MLflow
# runs made before the typed schema record these; provenance must still match them).
SAMPLE_RECIPE_SHA256 = {
    "demo-tiny": "f62a7840ea6be970b69a42b43157a31531db986772466ee73041b0d29e7f01bc",
    "demo-tiny-sdxl": "07eaf114279524e1bb8e479c412c998fd467670cec3b2edc608625125b353840",
    "demo-tiny-locon": "a5a7f8dfba6b20762b38d0dcb324233716e1dd3270be33b9e0b9ff9071728f65",  # issue 12
    "style-sd15": "4aac68de741c4ab82958757a61cd89f0b54f4939b4d1c853d88e81dcf6bfdd56",
    "style-sdxl": "b2a38493ce3d14188feae7fcdff833f1f2297d6968e1fe053a1ddb7d279e73f0",
}


def _recipe(tmp_path, text: str | None = None, **fields) -> Recipe:
    path = tmp_path / "r.yaml"
    path.write_text(text if text is not None else yaml.safe_dump({"base_model": "tiny-sd", **fields}))
    return load_recipe(path)


def _refused(tmp_path, *needles: str, text: str | None = None, **fields) -> str:
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        _recipe(tmp_path, text, **fields)
    assert time.monotonic() - started < 2.0  # never a hang
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "r.yaml"))
    for needle in needles:
        assert needle in message, message
    return message


def test_committed_samples_hash_as_before():
    hashes = {p.stem: load_recipe(p).sha256 for p in sorted(REPO_RECIPES.glob("*.yaml"))}
    assert {k: v for k, v in hashes.items() if k in SAMPLE_RECIPE_SHA256} == SAMPLE_RECIPE_SHA256


def test_defaults_and_numbers(tmp_path):
    recipe = _recipe(tmp_path, network_alpha=2, eval_weights=[0.5, 1])
    assert recipe.name == "r" and recipe.network_alpha == 2.0 and isinstance(recipe.network_alpha, float)
    assert recipe.eval_weights == (0.5, 1.0) and recipe.min_snr_gamma is None
    assert _recipe(tmp_path, min_snr_gamma=None, seed=None).seed == 42  # null: the default


@pytest.mark.parametrize(
    ("fields", "needles"),
    [
        ({"bucket_reso_steps": 0}, ["bucket_reso_steps", "at least 8", "got 0"]),
        ({"bucket_reso_steps": -64}, ["bucket_reso_steps", "at least 8", "got -64"]),
        ({"bucket_reso_steps": 12}, ["bucket_reso_steps", "multiple of 8"]),
        ({"learning_rate": -1}, ["learning_rate", "greater than 0"]),
        ({"learning_rate": float("nan")}, ["learning_rate", "finite"]),
        ({"learning_rate": float("inf")}, ["learning_rate", "finite"]),
        ({"guidance_scale": float("-inf")}, ["guidance_scale", "finite"]),
        ({"eval_weights": [1.0, float("nan")]}, ["eval_weights[1]", "finite"]),
        ({"sample_steps": 0}, ["sample_steps", "at least 1"]),
        ({"eval_weights": []}, ["eval_weights", "empty"]),
        ({"resolution": 2880}, ["resolution", "at most 2048"]),  # 2880² is 8.3 megapixels
        ({"resolution": 500}, ["resolution", "multiple of 8"]),
        ({"max_bucket_reso": 100_000}, ["max_bucket_reso", "at most 4096"]),
        ({"min_bucket_reso": 2048, "max_bucket_reso": 1024}, ["min_bucket_reso must not be larger"]),
        ({"epochs": 10**40}, ["epochs", "at most"]),
        ({"epochs": "20"}, ["epochs", "whole number", "'20'"]),
        ({"epochs": 2.0}, ["epochs", "whole number"]),
        ({"train_batch_size": True}, ["train_batch_size", "whole number"]),
        ({"gradient_checkpointing": "yes"}, ["gradient_checkpointing", "true or false"]),
        ({"validation_split": 1.0}, ["validation_split", "less than 1"]),
        ({"mixed_precision": False}, ["mixed_precision", "'no', 'fp16' or 'bf16'", "got False"]),
        ({"optimizer": "SGD"}, ["optimizer", "DAdaptAdamW"]),
        ({"text_encoder_lr": 1e-4}, ["text_encoder_lr needs network_train_unet_only: false"]),
        ({"network_train_unet_only": False, "text_encoder_lr": 1e-4}, ["DAdaptAdamW adapts one step size"]),
        ({"conv_alpha": 1.0}, ["conv_alpha needs conv_dim"]),
        ({"optimizer": "Adafactor", "lr_scheduler": "cosine"}, ["Adafactor sets its own schedule"]),
        ({"optimizer": "Adafactor", "lr_warmup_steps": 5}, ["relative-step Adafactor has no warm-up"]),
        ({"optimizer": "AdamWScheduleFree", "lr_scheduler": "linear"}, ["schedule-free", "lr_scheduler: constant"]),
        ({"zero_terminal_snr": True}, ["zero_terminal_snr needs v_parameterization"]),
        ({"sample_every_n_epochs": 1}, ["sample_every_n_epochs needs sample_prompts"]),
        ({"gradient_accumulation_steps": 0}, ["gradient_accumulation_steps", "at least 1"]),
        ({"sample_prompts": "one prompt"}, ["sample_prompts", "list"]),
        ({"name": "other"}, ["name", "file stem"]),
        ({"lora_rank": 4}, ["lora_rank", "unknown field"]),
    ],
)
def test_wrong_values_are_one_line_naming_the_field(tmp_path, fields, needles):
    _refused(tmp_path, *needles, **fields)


def test_base_model_is_required(tmp_path):
    _refused(tmp_path, "base_model: required field is missing", text="epochs: 2\n")
    _refused(tmp_path, "base_model", "empty", base_model="")


def test_replace_validates(tmp_path):
    recipe = _recipe(tmp_path)
    assert replace(recipe, seed=7).seed == 7
    with pytest.raises(ValueError, match="sample_steps"):
        replace(recipe, sample_steps=0)


def test_groups_are_views_of_the_fields_and_the_bucket_defaults_are_the_buckets_modules(tmp_path):
    recipe = _recipe(tmp_path, conv_dim=8, noise_offset=0.05, flip_aug=True, train_on=["hardware-*"],
                     resolution=256, lr_scheduler="cosine")
    groups = (recipe.network, recipe.optimizer_settings, recipe.schedule, recipe.noise, recipe.augmentation,
              recipe.automation, recipe.buckets)
    for group in groups:
        assert all(getattr(group, f.name) == getattr(recipe, f.name) for f in fields(group)), group
    assert recipe.network.conv_alpha_value == 1.0 and recipe.augmentation.caption_dropout.on is False
    assert recipe.automation.trains_on("hardware-curated-v3") and not recipe.automation.trains_on("other-v1")
    assert recipe.buckets == BucketSettings(resolution=256) and recipe.schedule.lr_scheduler == "cosine"
    defaults = Recipe(name="r", base_model="tiny-sd")
    assert defaults.buckets == DEFAULT_BUCKETS  # the recipe's bucket defaults are buckets.py's
    assert set(later_fields(Recipe)) >= {"fast_path", "conv_dim", "flip_aug"} and "train_on" not in later_fields(Recipe)
    assert replace(defaults, train_on=("x",)).sha256 == defaults.sha256  # train_on is never hashed
