"""Multi-resolution training (issue 25, ai-toolkit's resolution list as the recipe's `resolutions`): every image
at each side in every epoch, bucketed per side, its latents cached per side, and the dataset report's histogram
per side. One one-epoch run on tiny-sd with the U-Net's inputs recorded; the report's summary without training."""

from __future__ import annotations

import pytest
from diffusers import UNet2DConditionModel

from lora_pipeline.core.datasets.buckets import BucketSettings, select_bucket
from lora_pipeline.core.datasets.checks.report import bucket_lines
from lora_pipeline.core.datasets.checks.validation import bucket_summary
from lora_pipeline.core.datasets.images import ImageInfo
from lora_pipeline.core.training.inputs.data import load_training_data, steps_per_epoch
from lora_pipeline_tests.helpers import tiny_recipe, train

pytestmark = pytest.mark.xdist_group("multires")

SIDES = (64, 128)
MULTI = tiny_recipe(epochs=1, validation_split=0.0, optimizer="AdamW", learning_rate=1e-3, resolutions=SIDES,
                    cache_latents_to_disk=True)


@pytest.fixture(scope="module")
def multires_run(module_snapshot):
    """The MULTI run on a fresh root, with the (width, height) of every image the U-Net was given."""
    root = module_snapshot(n=4, repeats=1)
    seen: list[tuple[int, int]] = []
    forward = UNet2DConditionModel.forward

    def recording(self, sample, *args, **kwargs):
        seen.extend([(sample.shape[-1] * 8, sample.shape[-2] * 8)] * sample.shape[0])
        return forward(self, sample, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(UNet2DConditionModel, "forward", recording)
        result, _ = train(root, MULTI, "multires")
    return root, result, seen


def test_a_run_sees_every_images_bucket_at_every_resolution(multires_run):
    root, result, seen = multires_run
    data = load_training_data(root.dataset("train-v1"), MULTI.buckets, 0.0)
    sizes = {image.rel: image.size for image in data.train}
    want = sorted(select_bucket(*size, MULTI.buckets.buckets(side)) for side in SIDES for size in sizes.values())
    assert sorted(seen) == want  # each image once per side in the epoch, at that side's bucket
    for side in SIDES:  # both sides' buckets are trained, the larger side's larger
        at_side = {select_bucket(*size, MULTI.buckets.buckets(side)) for size in sizes.values()}
        assert at_side <= set(seen) and all(w * h <= side * side for w, h in at_side)
    assert max(w * h for w, h in seen) > 64 * 64
    assert len(data.train) == len(SIDES) * len(sizes) and data.num_train_images == len(data.train)
    assert data.dataset_dirs() == {"1_trg": {"n_repeats": 1, "img_count": len(sizes)}}  # each image once
    assert result.epochs[-1]["steps"] == steps_per_epoch(data.images, data.image_repeats, 2)  # inside each bucket


def test_latents_are_cached_once_per_resolution(multires_run):
    root, _, _ = multires_run
    data = load_training_data(root.dataset("train-v1"), MULTI.buckets, 0.0)
    per_side = {(image.sha256, image.bucket) for image in data.train}
    assert len(per_side) == len(SIDES) * len({image.sha256 for image in data.train})  # no side shares a bucket
    assert len(list((root.cache / "latents").rglob("*.safetensors"))) == len(per_side)


def test_the_report_histogram_counts_each_side():
    infos = {"a.png": ImageInfo("a.png", 1, "PNG", 96, 64), "b.png": ImageInfo("b.png", 1, "PNG", 64, 64)}
    single = BucketSettings(resolution=64, min_bucket_reso=32, max_bucket_reso=256, bucket_reso_steps=16)
    multi = BucketSettings(resolution=64, min_bucket_reso=32, max_bucket_reso=256, bucket_reso_steps=16,
                           resolutions=(64, 128))
    plain = bucket_summary(infos, single)
    assert "resolutions" not in plain and all("resolution" not in row for row in plain["histogram"])
    summary = bucket_summary(infos, multi, ["multi"])
    assert summary["resolutions"] == [64, 128] and summary["images"] == plain["images"]
    rows = {(row["resolution"], row["width"], row["height"]): row["count"] for row in summary["histogram"]}
    assert sum(rows.values()) == 2 * len(infos)
    for side in (64, 128):
        for info in infos.values():
            assert (side, *select_bucket(info.width, info.height, multi.buckets(side))) in rows
    lines = bucket_lines(summary)
    assert "## Aspect-ratio buckets (resolutions 64, 128, step 16)" in lines
    assert "| side | bucket | images |  |" in lines and "| 128 | 128x128 | 1 | " in "\n".join(lines)


def test_resolutions_are_checked_against_the_family(tmp_path):
    from lora_pipeline.core.errors import UserError
    from lora_pipeline.core.training.recipe import parse_recipe
    from lora_pipeline_tests.helpers import TINY

    with pytest.raises(UserError, match="resolutions must not repeat a side"):
        parse_recipe({**TINY, "name": "r", "resolutions": [64, 64]}, tmp_path / "r.yaml")
    with pytest.raises(UserError, match=r"resolutions\[1\] must be a multiple of 16"):
        parse_recipe({**TINY, "name": "r", "base_model": "tiny-flux", "model_family": "flux1",
                      "resolutions": [64, 72]}, tmp_path / "r.yaml")
    assert parse_recipe({**TINY, "name": "r", "resolutions": [64, 96]}, tmp_path / "r.yaml").buckets.sides == (64, 96)
