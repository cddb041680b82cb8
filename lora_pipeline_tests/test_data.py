"""Training data: snapshot reading and checks, the validation split, kohya buckets and epoch batches."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace

import pytest

from lora_pipeline.core.datasets.buckets import bucket_resolutions
from lora_pipeline.core.datasets.snapshot.manifest import ManifestRow
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import read_json, write_json
from lora_pipeline.core.paths import SNAPSHOT
from lora_pipeline.core.training.inputs.data import (
    epoch_batches,
    fit_to_bucket,
    load_training_data,
    split_train_validation,
    steps_per_epoch,
)
from lora_pipeline.core.training.recipe import Recipe

RECIPE = Recipe(name="r", base_model="tiny-sd", resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                bucket_reso_steps=16, validation_split=0.2)


def test_split_is_by_sha256_order_and_never_empties_training():
    rows = [ManifestRow(path=f"img/{i}.png", kind="image", sha256=f"{(7 * i) % 10:02d}", bytes=1) for i in range(10)]
    train, val = split_train_validation(rows, 0.2)
    assert [r.sha256 for r in val] == ["00", "01"]
    assert [r.sha256 for r in train] == [f"{i:02d}" for i in range(2, 10)]
    assert split_train_validation(list(reversed(rows)), 0.2) == (train, val)  # row order does not matter
    assert len(split_train_validation(rows[:3], 0.1)[1]) == 1  # a positive split holds out at least one
    assert len(split_train_validation(rows[:1], 0.5)[1]) == 0  # but never the only image
    assert split_train_validation(rows, 0.0)[1] == []


def test_snapshot_is_read_split_and_bucketed(train_snapshot):
    root = train_snapshot(n=6, repeats=3)
    data = load_training_data(root.dataset("train-v1"), RECIPE.buckets, RECIPE.validation_split)
    assert (len(data.train), len(data.validation), data.repeats, data.num_train_images) == (5, 1, 3, 15)
    resos = bucket_resolutions(64, 32, 128, 16)
    for image in data.train + data.validation:
        assert image.bucket in resos and image.caption.startswith("trg, ")
        (rw, rh), (top, left), (bw, bh) = image.resized, image.crop_top_left, image.bucket
        assert rw >= bw and rh >= bh and (rw == bw or rh == bh)  # covers the bucket, one side exact
        assert (top, left) == ((rh - bh) // 2, (rw - bw) // 2)
        assert tuple(image.pixels().shape) == (3, bh, bw)
    by_size = {image.size: image.bucket for image in data.train + data.validation}
    assert by_size[(96, 64)][0] > by_size[(96, 64)][1] and by_size[(64, 96)][0] < by_size[(64, 96)][1]
    assert data.dataset_dirs() == {"3_trg": {"n_repeats": 3, "img_count": 5}}
    frequency = data.tag_frequency(",")["3_trg"]
    assert frequency["trg"] == 5 and sum(frequency.values()) == sum(len(i.caption.split(",")) for i in data.train)

    # kohya's ss_bucket_info: training images with their repeats, by the bucket's index in kohya's order
    info = data.bucket_info(True, resos)
    assert sum(b["count"] for b in info["buckets"].values()) == 15
    assert all(resos[i] == b["resolution"] and b["count"] % 3 == 0 for i, b in info["buckets"].items())
    assert 0 < info["mean_img_ar_error"] < 1 and data.bucket_info(False, resos) is None

    square = load_training_data(root.dataset("train-v1"), replace(RECIPE, enable_bucket=False).buckets,
                                RECIPE.validation_split)
    assert {image.bucket for image in square.train} == {(64, 64)}


def test_fit_to_bucket_follows_kohya():
    assert fit_to_bucket((1024, 768), (576, 448)) == ((597, 448), (0, 10))  # wider: the height fits
    assert fit_to_bucket((768, 1024), (448, 576)) == ((448, 597), (10, 0))
    assert fit_to_bucket((50, 50), (64, 64)) == ((64, 64), (0, 0))  # upscaled to cover


def test_epoch_batches_stay_in_one_bucket_repeat_each_image_and_are_seeded(train_snapshot):
    data = load_training_data(train_snapshot(n=6, repeats=3).dataset("train-v1"), RECIPE.buckets,
                              RECIPE.validation_split)
    images = data.train
    batches = epoch_batches(images, 3, 2, seed=7, epoch=1)
    assert len(batches) == steps_per_epoch(images, 3, 2)
    assert Counter(i for batch in batches for i in batch) == {i: 3 for i in range(len(images))}
    assert all(len({images[i].bucket for i in batch}) == 1 and 1 <= len(batch) <= 2 for batch in batches)
    assert epoch_batches(images, 3, 2, seed=7, epoch=1) == batches
    assert epoch_batches(images, 3, 2, seed=7, epoch=2) != batches
    assert epoch_batches(images, 3, 2, seed=8, epoch=1) != batches


def test_training_refuses_a_snapshot_that_differs_from_its_manifest(train_snapshot):
    root = train_snapshot(n=3)
    snapshot = root.dataset("train-v1")
    image = next(snapshot.glob("img/*/*.png"))
    data = bytearray(image.read_bytes())
    data[-20] ^= 1
    os.chmod(image, 0o644)
    image.write_bytes(bytes(data))
    with pytest.raises(UserError, match="content differs from the manifest"):
        load_training_data(snapshot, RECIPE.buckets, RECIPE.validation_split)


def test_training_needs_a_complete_caption_set(train_snapshot):
    snapshot = train_snapshot(n=3).dataset("train-v1")
    info = read_json(snapshot / SNAPSHOT)
    write_json(snapshot / SNAPSHOT, {**info, "captions_complete": False})
    with pytest.raises(UserError, match="materialize caption_set first"):
        load_training_data(snapshot, RECIPE.buckets, RECIPE.validation_split)
    write_json(snapshot / SNAPSHOT, {**info, "manifest_root": "0" * 64})
    with pytest.raises(UserError, match="rows do not match manifest_root"):
        load_training_data(snapshot, RECIPE.buckets, RECIPE.validation_split)
