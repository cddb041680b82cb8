"""The committed sample data: the generator, the three source batches, the specs and the recipes."""

from __future__ import annotations

import csv
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lora_pipeline.core.datasets.captions.caption_lint import lint_captions
from lora_pipeline.core.datasets.spec import DatasetSpec, load_spec
from lora_pipeline.core.hashing import sha256_bytes, sha256_file
from lora_pipeline.core.paths import READY_MARKER, REPO_ROOT, DataRoot
from lora_pipeline.core.training.recipe import load_recipe
from lora_pipeline_tests.helpers import committed_data

SCRIPT = REPO_ROOT / "scripts" / "make_sample_data.py"
DATA = DataRoot(committed_data())
BATCHES = ["curated-2026-10", "turntable-renders-2026-11", "promoted-candidates-2026-11", "masked-closeups-2026-12",
           "class-images-2026-12"]
SPECS = ["hardware-design-aesthetic-v1", "hardware-design-aesthetic-v2", "hardware-promoted-merge-v1",
         "hardware-masked-reg-v1"]
RECIPES = ["demo-tiny", "demo-tiny-sdxl", "demo-tiny-locon", "demo-tiny-flux", "style-sd15", "style-sdxl"]
IMAGE_SUFFIXES = {".png", ".jpg"}


def tree(root: Path, decode_images: bool = False) -> dict[str, str]:
    """Relative path -> sha256 of every file under root; of its decoded pixels for images when asked.

    Across machines only the pixels are guaranteed: PNG bytes depend on the zlib build Pillow links.
    """
    def digest(p: Path) -> str:
        if decode_images and p.suffix in IMAGE_SUFFIXES:
            with Image.open(p) as im:
                return f"{im.size}:{sha256_bytes(im.convert('RGB').tobytes())}"
        return sha256_file(p)

    return {p.relative_to(root).as_posix(): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def images(batch: str) -> list[Path]:
    return sorted(p for p in DATA.batch(batch).iterdir() if p.suffix in IMAGE_SUFFIXES and ".mask" not in p.name)


def spec(name: str) -> DatasetSpec:
    return load_spec(DATA.spec_file(name))


def attribute_rows() -> list[dict[str, str]]:
    with open(DATA.batch("turntable-renders-2026-11") / "attributes.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def all_captions() -> dict[str, str]:
    """Image file name -> caption, as each batch's spec would caption it (sidecar or attributes template)."""
    captions = {}
    for batch in ("curated-2026-10", "promoted-candidates-2026-11", "masked-closeups-2026-12"):
        for image in images(batch):
            captions[image.name] = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
    v2 = spec("hardware-design-aesthetic-v2")
    for row in attribute_rows():
        captions[row["file"]] = v2.captions.template.format(trigger=v2.trigger, **row)
    return captions


def dhash(path: Path) -> int:
    """64-bit difference hash: is each cell of a 9x8 grayscale thumbnail brighter than its right neighbour."""
    cells = Image.open(path).convert("L").resize((9, 8), Image.Resampling.BOX).tobytes()
    bits = 0
    for row, col in itertools.product(range(8), range(8)):
        bits = bits << 1 | (cells[row * 9 + col] > cells[row * 9 + col + 1])
    return bits


def run_generator(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_generator_is_deterministic_matches_the_committed_batches_and_force_replaces(tmp_path: Path) -> None:
    """One --force run over a stale folder: byte-equal to the committed batches, which an earlier run of the same
    code wrote (so two runs agree), and nothing of the stale folder left."""
    forced = tmp_path / "forced"
    stale = forced / "curated-2026-10" / "stale.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left over from an older run")
    run = run_generator(forced, "--force")
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert not stale.exists()
    assert sorted(p.name for p in forced.iterdir()) == sorted(BATCHES)  # no staging folders left behind
    for batch in BATCHES:
        committed = tree(DATA.batch(batch), decode_images=True)
        assert tree(forced / batch, decode_images=True) == committed, f"{batch}: committed files differ from the output"
        assert READY_MARKER in committed and (forced / batch / READY_MARKER).stat().st_size == 0


def test_generator_refuses_to_touch_an_existing_batch(tmp_path: Path) -> None:
    existing = tmp_path / "turntable-renders-2026-11"
    existing.mkdir()
    (existing / "render.png").write_bytes(b"someone else's handoff")
    run = run_generator(tmp_path)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 1
    assert err.strip().count("\n") == 0 and "turntable-renders-2026-11" in err and "--force" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["turntable-renders-2026-11"]  # nothing else written
    assert [p.name for p in existing.iterdir()] == ["render.png"]


def test_batches_are_ready_small_and_big_enough() -> None:
    assert set(DATA.ready_batches()) >= set(BATCHES)
    total = sum(p.stat().st_size for p in DATA.sources.rglob("*") if p.is_file())
    assert total <= 6 * 1024 * 1024, f"data/sources holds {total} bytes"
    counts = {batch: len(images(batch)) for batch in BATCHES}
    assert counts == {"curated-2026-10": 8, "turntable-renders-2026-11": 12, "promoted-candidates-2026-11": 6,
                      "masked-closeups-2026-12": 3, "class-images-2026-12": 3}
    checks = spec("hardware-design-aesthetic-v1").checks
    for batch in BATCHES:
        for image in images(batch):
            with Image.open(image) as im:
                im.verify()
            with Image.open(image) as im:
                assert min(im.size) >= checks.min_side, image
                assert max(im.size) / min(im.size) <= checks.max_aspect, image
                assert im.format == ("JPEG" if batch.startswith("promoted") else "PNG"), image


def test_every_image_has_exactly_one_caption_source() -> None:
    for batch in ("curated-2026-10", "promoted-candidates-2026-11", "masked-closeups-2026-12"):
        stems = {p.stem for p in images(batch)}
        sidecars = {p.stem for p in DATA.batch(batch).glob("*.txt")}
        assert stems == sidecars, batch
    masks = {p.name.removesuffix(".mask.png") for p in DATA.batch("masked-closeups-2026-12").glob("*.mask.png")}
    assert masks == {p.stem for p in images("masked-closeups-2026-12")}
    assert not list(DATA.batch("class-images-2026-12").glob("*.txt"))  # class images take their class_tokens
    rows = attribute_rows()
    assert list(rows[0]) == ["file", "view", "color", "finish", "top", "screen", "buttons", "background"]
    assert sorted(r["file"] for r in rows) == [p.name for p in images("turntable-renders-2026-11")]
    assert not list(DATA.batch("turntable-renders-2026-11").glob("*.txt"))


@pytest.mark.parametrize("name", SPECS)
def test_captions_are_clean_under_each_spec(name: str) -> None:
    """No lint problem at all; trigger first, no banned word, every tag one of the vocabulary's, none shared."""
    s = spec(name)
    captions = all_captions()
    problems, _, _ = lint_captions(captions, s)
    assert problems == []
    for file, caption in captions.items():
        tags = [t.strip() for t in caption.split(",")]
        assert tags[0] == s.trigger, file
        assert set(tags[1:]) <= set(s.captions.vocabulary), f"{file}: {set(tags[1:]) - set(s.captions.vocabulary)}"
        for banned in s.captions.banned:
            assert not re.search(rf"\b{re.escape(banned)}\b", caption, re.IGNORECASE), f"{file}: {banned}"
    assert len(set(captions.values())) == len(captions), "two images share a caption"


def test_no_two_images_are_near_duplicates() -> None:
    hashes = {p.name: dhash(p) for batch in BATCHES for p in images(batch)}
    distances = {(a, b): bin(hashes[a] ^ hashes[b]).count("1") for a, b in itertools.combinations(hashes, 2)}
    closest = min(distances, key=distances.get)
    assert distances[closest] > 10, f"{closest} are only {distances[closest]} bits apart"


def test_specs_load_and_reference_what_exists() -> None:
    assert set(SPECS) <= set(DATA.spec_versions())
    v1, v2, merged, masked = (spec(n) for n in SPECS)
    assert [(s.name, s.masks, s.role, s.class_tokens) for s in masked.sources] == [
        ("curated-2026-10", "none", "training", None), ("masked-closeups-2026-12", "file", "training", None),
        ("class-images-2026-12", "none", "regularisation", "appliance")]
    assert [(s.kind, s.name) for s in v1.sources] == [("batch", "curated-2026-10")]
    assert [(s.kind, s.name, s.include) for s in v2.sources] == [
        ("dataset", v1.name, ()), ("batch", "turntable-renders-2026-11", ("*.png",))]
    assert [(s.kind, s.name) for s in merged.sources] == [
        ("dataset", v2.name), ("batch", "promoted-candidates-2026-11")]
    assert (v1.merge, v2.merge, merged.merge) == (False, False, True)
    assert (v1.captions.source, v2.captions.source, merged.captions.source) == ("sidecar", "attributes", "sidecar")
    fields = set(re.findall(r"{(\w+)}", v2.captions.template))
    assert fields - {"trigger"} <= set(attribute_rows()[0])
    for s in (v1, v2, merged, masked):
        assert s.trigger == "hdaesth" and s.repeats == 10
        assert set(s.captions.banned) == {"appliance", "product", "coffee machine"}
        assert (s.checks.min_side, s.checks.max_aspect, s.checks.near_duplicates) == (512, 2.5, "warn")
        assert s.intent
        for source in s.sources:
            assert source.name in (BATCHES if source.kind == "batch" else SPECS)


def test_recipes_load_and_prompt_in_the_caption_schema() -> None:
    assert set(RECIPES) <= set(DATA.recipe_names())
    vocabulary = set(spec("hardware-design-aesthetic-v1").captions.vocabulary)
    recipes = {name: load_recipe(DATA.recipe_file(name)) for name in RECIPES}
    for recipe in recipes.values():
        assert recipe.sample_prompts and recipe.eval_weights == (0.6, 0.8, 1.0, 1.2)
        for prompt in recipe.sample_prompts:
            tags = [t.strip() for t in prompt.split(",")]
            assert tags[0] == "hdaesth" and set(tags[1:]) <= vocabulary, prompt  # the caption schema's tags
    tiny, tiny_xl = recipes["demo-tiny"], recipes["demo-tiny-sdxl"]
    assert (tiny.base_model, tiny.model_family, tiny_xl.base_model, tiny_xl.model_family) == (
        "tiny-sd", "sd15", "tiny-sdxl", "sdxl")
    locon = recipes["demo-tiny-locon"]
    assert (locon.conv_dim, locon.sample_every_n_epochs) == (4, 1)  # LoCon, samples while training
    for recipe in (tiny, tiny_xl, locon):  # CPU-sized
        assert (recipe.resolution, recipe.epochs, recipe.network_dim, recipe.sample_steps) == (64, 4, 4, 4)
        assert recipe.mixed_precision == "no" and recipe.validation_split == 0.2
    flux = recipes["demo-tiny-flux"]  # CPU-sized too; double blocks, which diffusers loads for the grid at tiny widths
    assert (flux.base_model, flux.model_family, flux.train_blocks, flux.optimizer) == (
        "tiny-flux", "flux1", "double", "AdamW")
    assert (flux.resolution, flux.network_dim, flux.sample_steps, flux.mixed_precision) == (64, 4, 4, "no")
    assert flux.epochs <= 4 and flux.validation_split == 0.2
    assert all(side % 16 == 0 for side in (flux.resolution, flux.min_bucket_reso, flux.max_bucket_reso,
                                           flux.bucket_reso_steps))  # FLUX's pixel multiple
    assert (recipes["style-sd15"].resolution, recipes["style-sdxl"].resolution) == (512, 1024)
    assert recipes["style-sdxl"].model_family == "sdxl"
    for recipe in (recipes["style-sd15"], recipes["style-sdxl"]):
        assert (recipe.epochs, recipe.network_dim, recipe.network_alpha) == (20, 32, 16.0)
        assert recipe.optimizer == "DAdaptAdamW" and recipe.learning_rate == 1.0
        assert recipe.mixed_precision == "bf16" and recipe.gradient_checkpointing and recipe.cache_latents
