"""Loss masks and regularisation images: through a real snapshot build, the report, and tiny-sd training."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_pipeline.core.datasets.checks.contact_sheet import MASK_COLOUR
from lora_pipeline.core.datasets.snapshot.manifest import read_manifest, verify_snapshot
from lora_pipeline.core.datasets.snapshot.snapshot import build_snapshot
from lora_pipeline.core.datasets.spec import ChecksSpec, DatasetSpec, SourceRef
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.training.inputs.data import epoch_batches, load_training_data, mix_reg_repeats
from lora_pipeline.core.training.kohya.lora_file import read_lora_metadata
from lora_pipeline.core.training.recipe_groups import NoiseSettings
from lora_pipeline.core.training.step.denoising import StepBatch, compute_loss
from lora_pipeline_tests.helpers import FAMILIES, finish_version, tiny_recipe, train


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def half_mask(size=(64, 64), left=0, right=255) -> Image.Image:
    array = np.full((size[1], size[0]), right, dtype=np.uint8)
    array[:, : size[0] // 2] = left
    return Image.fromarray(array, "L")


def spec(name: str, *sources: SourceRef) -> DatasetSpec:
    return DatasetSpec(name=name, trigger="trg", repeats=2, sources=sources, checks=ChecksSpec(min_side=32))


@pytest.fixture
def masked_root(tmp_path, make_batch, picture, tiny_model):
    """A data root with a masked batch (mask files), an alpha batch, a class-image batch and the tiny models."""
    root = DataRoot(tmp_path / "data")
    root.models.mkdir(parents=True)
    for model in ("tiny-sd", "tiny-flux"):
        (root.models / model).symlink_to(tiny_model(model))
    files: dict[str, bytes | str] = {}
    for i in range(3):
        files[f"m{i}.png"] = png(picture(10 + i, (64, 64)))
        files[f"m{i}.mask.png"] = png(half_mask())
        files[f"m{i}.txt"] = f"trg, tag{i}, red body"
    make_batch(root, "masked", files)
    rgba = picture(20, (64, 64)).convert("RGBA")
    rgba.putalpha(half_mask())
    make_batch(root, "alpha", {"a0.png": png(rgba), "a0.txt": "trg, alpha one"})
    make_batch(root, "classes", {f"c{i}.png": png(picture(30 + i, (64, 64))) for i in range(2)})
    return root


def test_masks_and_class_images_are_copied_listed_validated_and_shown(masked_root, make_batch, picture):
    root = masked_root
    good = spec("good-v1", SourceRef(batch="masked", masks="file"), SourceRef(batch="alpha", masks="alpha"),
                SourceRef(batch="classes", role="regularisation", class_tokens="gadget", repeats=3))
    build_snapshot(root, good, "c")
    finish_version(root, good)
    snap = root.dataset("good-v1")
    rows = {r.path: r for r in read_manifest(snap)}
    assert rows["img/2_trg/m0.png"].mask == "img/2_trg/m0.mask.png"
    mask_row = rows["img/2_trg/m0.mask.png"]
    assert (mask_row.kind, mask_row.image, mask_row.source_path) == ("mask", "img/2_trg/m0.png", "m0.mask.png")
    assert rows["img/2_trg/a0.png"].mask == "alpha"
    assert rows["reg/3_gadget/c0.png"].kind == "reg_image"
    assert (snap / "reg/3_gadget/c0.txt").read_text() == "gadget\n"
    assert rows["reg/3_gadget/c0.txt"].kind == "reg_caption"
    assert verify_snapshot(snap).ok
    report = json.loads((snap / "report.json").read_text())
    assert report["passed"], report["problems"]
    counts = report["counts"]
    assert (counts["images"], counts["masked_images"], counts["regularisation_images"]) == (4, 4, 2)
    assert counts["regularisation_by_folder"] == {"reg/3_gadget": 2}
    with Image.open(snap / "contact_sheet.png") as sheet:
        assert (np.asarray(sheet.convert("RGB")) == MASK_COLOUR).all(axis=2).sum() > 100  # mask outlines drawn

    # Every way a mask can be unusable is an error that blocks training.
    black = Image.new("L", (64, 64), 0)
    make_batch(root, "bad", {
        "b0.png": png(picture(40, (64, 64))), "b0.txt": "trg, b zero",  # no mask
        "b1.png": png(picture(41, (64, 64))), "b1.txt": "trg, b one", "b1.mask.png": png(half_mask((48, 64))),
        "b2.png": png(picture(42, (64, 64))), "b2.txt": "trg, b two", "b2.mask.png": png(picture(1, (64, 64))),
        "b3.png": png(picture(43, (64, 64))), "b3.txt": "trg, b three", "b3.mask.png": png(black),
    })
    make_batch(root, "noalpha", {"n0.png": png(picture(44, (64, 64))), "n0.txt": "trg, n zero"})
    bad = spec("bad-v1", SourceRef(batch="bad", masks="file"), SourceRef(batch="noalpha", masks="alpha"))
    build_snapshot(root, bad, "c")
    finish_version(root, bad)
    report = json.loads((root.dataset("bad-v1") / "report.json").read_text())
    found = {(p["file"].rsplit("/", 1)[-1], p["code"]) for p in report["problems"] if p["severity"] == "error"}
    assert found == {("b0.png", "mask_missing"), ("b1.png", "mask_size"), ("b2.png", "mask_channels"),
                     ("b3.png", "mask_empty"), ("n0.png", "mask_missing")}
    assert not report["passed"]

    with pytest.raises(ValueError, match="class_tokens"):
        SourceRef(batch="classes", role="regularisation")
    # Specs written before these fields keep their hash (built versions stay valid).
    plain = spec("plain-v1", SourceRef(batch="masked"))
    assert "masks" not in plain.resolved()["sources"][0] and "role" not in plain.resolved()["sources"][0]


class OutputShift(torch.nn.Module):
    """The U-Net with a learnable change added to its prediction: d(loss)/d(shift) is the loss's gradient with
    respect to the prediction, position by position."""

    def __init__(self, unet: torch.nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.unet, self.shift = unet, torch.nn.Parameter(torch.zeros(shape))

    def forward(self, *args, **kwargs):
        out = self.unet(*args, **kwargs)
        out.sample = out.sample + self.shift
        return out


MASKED_RECIPE = {"epochs": 1, "masked_loss": True, "validation_split": 0.34, "prior_loss_weight": 0.5}


def build_masked_version(root: DataRoot) -> None:
    """train-v1: the masked batch (mask files) and the class images (regularisation, repeats 1)."""
    version = spec("train-v1", SourceRef(batch="masked", masks="file"),
                   SourceRef(batch="classes", role="regularisation", class_tokens="gadget", repeats=1))
    build_snapshot(root, version, "c")
    finish_version(root, version)


def test_masked_loss_ignores_the_blanked_half_and_class_images_mix_in(masked_root):
    from lora_pipeline.core.models.loading import load_base_model

    root = masked_root
    build_masked_version(root)
    recipe = tiny_recipe(**MASKED_RECIPE)
    data = load_training_data(root.dataset("train-v1"), recipe.buckets, recipe.validation_split)
    assert len(data.train) == 2 and len(data.validation) == 1 and len(data.reg) == 2  # class images never held out
    assert data.reg_repeats == (2, 2) and data.num_reg_images == 2  # kohya fills them up to 2 x 2 samples
    image = data.train[0]
    mask = image.mask_pixels()
    assert mask.shape == (1, 64, 64) and mask[..., :32].max() == 0 and mask[..., 32:].min() == 1

    base = load_base_model(root.models, "tiny-sd", "sd15")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 77, base.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    model = OutputShift(base.unet, (1, 4, 8, 8))
    batch = StepBatch(latents=latents, encoder_hidden_states=hidden, mask=mask[None])
    compute_loss(model, base.noise_scheduler, batch, torch.Generator().manual_seed(2), NoiseSettings()).backward()
    grad = model.shift.grad
    assert grad[..., :4].abs().max() == 0 and grad[..., 4:].abs().min() > 0  # left half of the latent: no gradient

    # prior_loss_weight scales a class image's loss.
    weighted = StepBatch(latents=latents.repeat(2, 1, 1, 1), encoder_hidden_states=hidden.repeat(2, 1, 1),
                         loss_weights=torch.tensor([1.0, 0.0]))
    with torch.no_grad():
        both = compute_loss(base.unet, base.noise_scheduler, weighted, torch.Generator().manual_seed(3),
                            NoiseSettings())
        again = StepBatch(latents=latents.repeat(2, 1, 1, 1), encoder_hidden_states=hidden.repeat(2, 1, 1),
                          loss_weights=torch.tensor([2.0, 0.0]))
        double = compute_loss(base.unet, base.noise_scheduler, again, torch.Generator().manual_seed(3),
                              NoiseSettings())
    assert torch.allclose(double, 2 * both) and both > 0

    batches = epoch_batches(data.images, data.image_repeats, 2, 42, 1)
    drawn = [data.images[i] for b in batches for i in b]
    assert sum(i.is_reg for i in drawn) == sum(not i.is_reg for i in drawn) == 4
    assert any(any(data.images[i].is_reg for i in b) and not all(data.images[i].is_reg for i in b) for b in batches)
    plain = spec("plain-v1", SourceRef(batch="alpha"))
    build_snapshot(root, plain, "c")
    finish_version(root, plain)
    with pytest.raises(UserError, match="has no masks"):
        train(root, tiny_recipe(masked_loss=True), "x", version="plain-v1")


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-flux"])
def test_masked_loss_and_class_images_train_and_are_in_the_header(masked_root, model):
    root = masked_root
    build_masked_version(root)
    recipe = tiny_recipe(**MASKED_RECIPE, base_model=model, model_family=FAMILIES[model])
    result, _ = train(root, recipe, "out", version="train-v1")
    assert result.steps_per_epoch == 4 and all(torch.isfinite(torch.tensor(result.loss_history)))
    unmasked, _ = train(root, replace(recipe, masked_loss=False), "unmasked", version="train-v1")
    assert unmasked.loss_history != result.loss_history  # the same draws, the masked half left out
    meta = read_lora_metadata(Path(result.epochs[-1]["file"]))
    assert meta["ss_masked_loss"] == "True" and meta["ss_num_reg_images"] == "2"
    assert meta["ss_prior_loss_weight"] == "0.5" and json.loads(meta["ss_reg_dataset_dirs"]) == {
        "1_gadget": {"img_count": 2, "n_repeats": 1}}


def test_masks_class_images_accumulation_ip_noise_and_checkpointing_replay_byte_identically_on_the_fast_path(
        masked_root):
    # every optional input of the step is a static buffer of the captured step (fastpath._Inputs): the loss masks,
    # the class images' per-image loss weights, ip_noise_gamma's perturbation, and the micro-batches of an
    # accumulated step (one recorded step for all of them); checkpointing recomputes without the RNG state (nothing
    # random in the U-Net's forward). On a CPU the recorded step is called again.
    root = masked_root
    build_masked_version(root)
    recipe = tiny_recipe(**{**MASKED_RECIPE, "epochs": 2}, ip_noise_gamma=0.1, gradient_accumulation_steps=2,
                         gradient_checkpointing=True)
    plain, _ = train(root, recipe, "plain", version="train-v1")
    fast, _ = train(root, replace(recipe, fast_path=True), "fast", version="train-v1")
    assert (plain.fast_path, fast.fast_path) == (False, True)
    assert fast.loss_history == plain.loss_history and all(torch.isfinite(torch.tensor(plain.loss_history)))
    for a, b in zip(plain.epochs, fast.epochs, strict=True):
        ta, tb = load_file(a["file"]), load_file(b["file"])
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_kohya_fill_of_class_images():
    assert mix_reg_repeats([1, 1], 5) == [3, 2]
    assert mix_reg_repeats([2, 3], 4) == [2, 3]  # more class samples than training samples: kohya keeps the round
    assert mix_reg_repeats([4, 4], 3) == [4, 0]  # the second one is not used
    assert mix_reg_repeats([], 10) == []
