"""Every kind of bad input, built for real in source batches and run through `lora-pipeline build`:
each is named in report.json's problems with the severity that blocks (error) or warns (warning)."""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from lora_pipeline_tests.helpers import assert_one_line_error, cli, tree_state

VERSION = "bad-inputs-v1"
TRIGGER = "hdaesth"


def _png(size=(640, 640), mode="RGB", seed=0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    base = Image.fromarray(rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)).resize(size)
    im = base.convert(mode) if mode not in ("I;16",) else base.convert("L").convert("I;16")
    buf = io.BytesIO()
    im.save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def _bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG whose header claims 900 megapixels (a decompression bomb); its data never needs reading."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _write(folder, name: str, data: bytes, caption: str | None = "default") -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if caption is not None:
        text = f"{TRIGGER}, front view, {name.split('.')[0]} body" if caption == "default" else caption
        path.with_suffix(".txt").write_text(text)


def test_every_bad_input_is_named_in_the_report(sample_root):
    a, b = sample_root.batch("messy-a"), sample_root.batch("messy-b")
    _write(a, "good.png", _png(seed=1))
    _write(a, "zero.png", b"")
    _write(a, "truncated.png", _png(seed=2)[:3000])
    _write(a, "text.png", b"this is not an image at all")
    _write(a, "bomb.png", _bomb_png())
    _write(a, "small.png", _png(size=(200, 200), seed=3))
    _write(a, "wide.png", _png(size=(1800, 600), seed=4))
    _write(a, "cmyk.jpg", _png(mode="CMYK", seed=5, format="JPEG"))
    _write(a, "deep.png", _png(mode="I;16", seed=6))
    _write(a, "alpha.png", _png(mode="RGBA", seed=7))
    _write(a, "palette.png", _png(mode="P", seed=8))
    _write(a, "copy-of-good.png", _png(seed=1))  # exact duplicate
    near = Image.open(io.BytesIO(_png(seed=1))).resize((632, 632))
    buf = io.BytesIO()
    near.save(buf, format="JPEG", quality=80)
    _write(a, "near-good.jpg", buf.getvalue())  # the same picture, resized and re-encoded
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated = io.BytesIO()
    Image.open(io.BytesIO(_png(size=(800, 600), seed=9))).save(rotated, format="JPEG", exif=exif)
    _write(a, "rotated.jpg", rotated.getvalue())
    _write(a, "latin1.png", _png(seed=10), caption=None)
    (a / "latin1.txt").write_bytes(f"{TRIGGER}, caf\xe9 body".encode("latin-1"))
    _write(a, "nocaption.png", _png(seed=11), caption=None)
    _write(a, "banned.png", _png(seed=12), caption=f"{TRIGGER}, front view, product shot")
    _write(a, "late-trigger.png", _png(seed=13), caption=f"front view, {TRIGGER}")
    (a / "orphan.txt").write_text(f"{TRIGGER}, an orphan caption")
    (a / "notes.pdf").write_bytes(b"%PDF-1.4")
    (a / ".DS_Store").write_bytes(b"junk")
    (a / "Thumbs.db").write_bytes(b"junk")
    _write(a, ".hidden/secret.png", _png(seed=14))
    os.symlink(a / "good.png", a / "link.png")
    (a / "_READY").write_text("")
    _write(b, "good.png", _png(seed=15))  # same basename as messy-a/good.png
    (b / "_READY").write_text("")
    sample_root.spec_file(VERSION).write_text(
        f"name: {VERSION}\ntrigger: {TRIGGER}\nrepeats: 2\nsources:\n  - batch: messy-a\n  - batch: messy-b\n"
        "captions:\n  from: sidecar\n  banned: [product]\nchecks:\n  min_side: 512\n  max_aspect: 2.5\n"
        "  max_pixels: 100000000\n"
    )
    before = {p: p.read_bytes() for p in a.rglob("*") if p.is_file() and not p.is_symlink()}

    assert_one_line_error(cli("build", VERSION, check=False), "blocking problem")

    report = json.loads((sample_root.dataset(VERSION) / "report.json").read_text())
    found = {(p["code"], p["severity"], p["file"].rsplit("/", 1)[-1]) for p in report["problems"]}
    expected = {
        ("zero_byte", "error", "zero.png"),
        ("truncated_image", "error", "truncated.png"),
        ("not_an_image", "error", "text.png"),
        ("decompression_bomb", "error", "bomb.png"),
        ("too_small", "error", "small.png"),
        ("aspect_ratio", "error", "wide.png"),
        ("colour_mode", "warning", "cmyk.jpg"),
        ("colour_mode", "warning", "deep.png"),
        ("colour_mode", "warning", "alpha.png"),
        ("colour_mode", "warning", "palette.png"),
        ("caption_not_utf8", "error", "latin1.txt"),
        ("missing_caption", "error", "nocaption.png"),
        ("banned_word", "error", "banned.png"),
        ("trigger_not_first", "error", "late-trigger.png"),
        ("orphan_caption", "warning", "orphan.txt"),
        ("non_image_file", "warning", "notes.pdf"),
        ("junk_skipped", "warning", ".DS_Store"),
        ("junk_skipped", "warning", "Thumbs.db"),
        ("symlink_not_followed", "warning", "link.png"),
    }
    assert expected <= found, sorted(expected - found)
    codes = {p["code"] for p in report["problems"]}
    assert {"exact_duplicate", "near_duplicate", "basename_collision"} <= codes
    assert any(p["code"] == "junk_skipped" and ".hidden" in p["file"] for p in report["problems"])
    assert report["passed"] is False
    # EXIF orientation applied: the 800x600 JPEG displays as 600x800, so it is not reported too small or wide
    assert not any(p["file"].endswith("rotated.jpg") and p["severity"] == "error" for p in report["problems"])
    # junk, hidden folders and symlinks are never copied; nothing in the batch changed
    copied = {p.name for p in sample_root.dataset(VERSION).rglob("*")}
    assert not ({".DS_Store", "Thumbs.db", "secret.png", "link.png", "notes.pdf"} & copied)
    assert before == {p: p.read_bytes() for p in a.rglob("*") if p.is_file() and not p.is_symlink()}


# --- config mistakes and names at the command line: one line, exit 1, nothing written ---------------------
# One case of each kind runs through the CLI; test_spec.py, test_recipe.py and test_yamlfile.py hold the rest
# (prepend_trigger "no", min_side true, duplicate keys, sample_steps 0, eval_weights [], infinity, 8 megapixels).
SPEC_V1 = "hardware-design-aesthetic-v1"


def _edit_spec(root, old: str, new: str) -> None:
    path = root.spec_file(SPEC_V1)
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("old", "new", "needles"),
    [
        ("  from: sidecar\n", "  from: sidecar\n  shared_caption_limit: lots\n",
         ["captions.shared_caption_limit: expected a whole number (got 'lots', text)"]),
        ("  from: sidecar\n", "  from: table\n  table: [a.csv, b.csv]\n",
         ["captions.table: expected text (got a list)"]),
        ("  from: sidecar\n", "  from: attributes\n  table: a.csv\n  template: 5\n",
         ["captions.template: expected text (got 5)"]),
        ("merge: false", 'merge: "false"', ["merge: expected true or false (got 'false', text)"]),
        ("trigger: hdaesth", 'trigger: "a/../../x"', ["trigger: 'a/../../x' is not a name"]),
        ("intent: ", "lol: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\nintent: *a\nx: ", ["aliases"]),
    ],
)
def test_a_wrong_spec_is_one_line_at_build(sample_root, old, new, needles):
    _edit_spec(sample_root, old, new)
    assert_one_line_error(cli("build", SPEC_V1, check=False), f"{SPEC_V1}.yaml: ", *needles)
    assert not sample_root.dataset(SPEC_V1).exists()


def test_a_50_mb_spec_is_refused_at_once(sample_root):
    with open(sample_root.spec_file(SPEC_V1), "ab") as f:
        f.write(b"# padding\n" * 5_000_000)
    started = time.monotonic()
    assert_one_line_error(cli("build", SPEC_V1, check=False), "larger than the limit of 1,000,000 bytes")
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("recipe", "needles"),
    [
        ("bucket_reso_steps: -64\n", ["bucket_reso_steps: must be at least 8 (got -64)"]),  # it used to hang
        ("learning_rate: -1\n", ["learning_rate: must be greater than 0"]),
        ("learning_rate: .nan\n", ["learning_rate: expected a finite number"]),
    ],
)
def test_a_recipe_out_of_range_is_one_line_at_train(sample_root, recipe, needles):
    sample_root.recipe_file("bad").write_text("base_model: tiny-sd\n" + recipe)
    started = time.monotonic()
    assert_one_line_error(cli("train", SPEC_V1, "--recipe", "bad", check=False), "bad.yaml: ", *needles)
    assert time.monotonic() - started < 60
    assert not sample_root.loras_root.exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["build", "/any/dir/y"], ["dataset version: '/any/dir/y' is not a name", "not a path"]),
        (["train", "../datasets/mini-v1", "--recipe", "demo-tiny"], ["'../datasets/mini-v1' is not a name"]),
        (["train", SPEC_V1, "--recipe", "../recipes/demo-tiny"], ["recipe: '../recipes/demo-tiny' is not a name"]),
        (["intake", "SRC", "--batch", "b1\n"], ["batch id: 'b1\\n' is not a name"]),
        (["verify", "../datasets"], ["dataset version: '../datasets' is not a name"]),
    ],
)
def test_paths_and_odd_names_on_the_command_line_are_refused(sample_root, tmp_path, args, needles):
    (tmp_path / "handoff").mkdir()
    (tmp_path / "handoff" / "a.png").write_bytes(_png(seed=1))
    before = tree_state(sample_root.root)
    args = [str(tmp_path / "handoff") if a == "SRC" else a for a in args]
    assert_one_line_error(cli(*args, check=False), *needles)
    assert tree_state(sample_root.root) == before
