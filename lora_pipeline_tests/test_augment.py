"""Caption dropout, flip_aug and random_crop in a real tiny-sd training, and their rules on their own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import SNAPSHOT
from lora_pipeline.core.training.inputs import encode
from lora_pipeline.core.training.inputs.augment import flip_warning, step_views
from lora_pipeline.core.training.inputs.caption_shuffle import step_captions
from lora_pipeline.core.training.kohya.lora_file import read_lora_metadata
from lora_pipeline.core.training.recipe import parse_recipe
from lora_pipeline.core.training.recipe_groups import CaptionDropout
from lora_pipeline.core.training.step import loop
from lora_pipeline_tests.helpers import FAMILIES, TINY, tiny_recipe, train

CAPTION = "trg, red body, matte finish, front view, round screen"


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-flux"])
def test_caption_dropout_one_empties_every_caption_and_flips_and_crops_vary_yet_it_trains(train_snapshot,
                                                                                          monkeypatch, model):
    root = train_snapshot(n=3, repeats=2)
    # flip_aug comes from the dataset spec here (kohya's dataset config), not the recipe: the run flips all the same
    info_path = root.dataset("train-v1") / SNAPSHOT
    info = json.loads(info_path.read_text())
    info["spec"]["flip_aug"] = True
    info_path.chmod(0o644)
    info_path.write_text(json.dumps(info))
    seen_captions: list[str] = []
    seen_views: list = []
    real_batch, real_views = encode.TextSource.batch, loop.step_views

    def record_captions(self, captions):
        seen_captions.extend(captions)
        return real_batch(self, captions)

    def record_views(*args):
        views = real_views(*args)
        seen_views.extend(views)
        return views

    monkeypatch.setattr(encode.TextSource, "batch", record_captions)
    monkeypatch.setattr(loop, "step_views", record_views)
    recipe = tiny_recipe(epochs=2, validation_split=0.0, caption_dropout_rate=1.0, random_crop=True,
                         cache_latents=False, base_model=model, model_family=FAMILIES[model])
    result, _ = train(root, recipe, "out")
    assert len(seen_captions) == 2 * 6 and set(seen_captions) == {""}
    assert all(torch.isfinite(torch.tensor(result.loss_history))) and result.total_steps == len(result.loss_history)
    assert {v.flip for v in seen_views} == {False, True}
    assert len({v.crop_top_left for v in seen_views}) > 3  # not only the three center crops
    assert result.latent_cache["vae_encodes"] == result.total_steps  # no cache: one encode per step
    meta = read_lora_metadata(Path(result.epochs[-1]["file"]))
    assert meta["ss_caption_dropout_rate"] == "1.0" and meta["ss_flip_aug"] == "True"
    assert meta["ss_random_crop"] == "True" and meta["ss_caption_tag_dropout_rate"] == "0.0"
    assert json.loads(meta["lora_pipeline.recipe_resolved"])["caption_dropout_rate"] == 1.0


def test_dropout_every_n_epochs_tag_dropout_and_keep_tokens():
    dropout = CaptionDropout(every_n_epochs=2)
    assert step_captions([CAPTION], ",", 1, True, 3, 2, 5, dropout) == [""]
    assert step_captions([CAPTION], ",", 1, True, 3, 3, 5, dropout) != [""]
    tags = CaptionDropout(tag_rate=0.5)
    lengths = set()
    for step in range(100):
        (caption,) = step_captions([CAPTION], ",", 2, False, 3, 1, step, tags)
        kept = caption.split(", ")
        assert kept[:2] == ["trg", "red body"]  # the first keep_tokens are never dropped or moved
        assert [t for t in CAPTION.split(", ") if t in kept] == kept  # no shuffle: order kept
        lengths.add(len(kept))
    assert lengths == {2, 3, 4, 5}
    rate = CaptionDropout(rate=0.3)
    dropped = sum(step_captions([CAPTION], ",", 1, True, 3, 1, s, rate) == [""] for s in range(400))
    assert 80 < dropped < 160
    assert step_captions([CAPTION], ",", 1, True, 3, 1, 9, rate) == step_captions([CAPTION], ",", 1, True, 3, 1, 9,
                                                                                   rate)


def test_views_flip_and_crop_the_pixels_and_the_recipe_rules(train_snapshot):
    from lora_pipeline.core.training.inputs.augment import View
    from lora_pipeline.core.training.inputs.data import load_training_data

    root = train_snapshot(n=1, repeats=1)
    (image,) = load_training_data(root.dataset("train-v1"), tiny_recipe().buckets, 0.0).train
    plain = image.pixels()
    assert torch.equal(image.pixels(View(True, image.crop_top_left)), plain.flip(-1))
    views = [v for s in range(40) for v in step_views([image], False, True, 1, s)]
    width, height = image.resized
    assert all(0 <= v.crop_top_left[0] <= height - image.bucket[1] and 0 <= v.crop_top_left[1] <= width -
               image.bucket[0] for v in views) and not any(v.flip for v in views)
    assert step_views([image], False, False, 1, 0) == [View(False, image.crop_top_left)]

    with pytest.raises(UserError, match="random_crop needs cache_latents: false"):
        parse_recipe({**TINY, "random_crop": True}, Path("tiny.yaml"))
    with pytest.raises(UserError, match="cache_latents_to_disk needs cache_latents: true"):
        parse_recipe({**TINY, "cache_latents": False, "cache_latents_to_disk": True}, Path("tiny.yaml"))
    assert flip_warning(["trg, red body", "trg, logo on the lid"]).startswith("flip_aug is on and 1 of 2")
    assert flip_warning(["trg, red body"]) is None


def test_new_fields_change_the_recipe_hash_only_when_set():
    base = tiny_recipe()
    for field, value in {"caption_dropout_rate": 0.1, "caption_dropout_every_n_epochs": 3,
                         "caption_tag_dropout_rate": 0.2, "flip_aug": True, "cache_latents_to_disk": True}.items():
        assert tiny_recipe(**{field: value}).sha256 != base.sha256
    assert tiny_recipe(random_crop=True, cache_latents=False).sha256 != tiny_recipe(cache_latents=False).sha256
    assert tiny_recipe(caption_dropout_rate=0.0, flip_aug=False).sha256 == base.sha256
