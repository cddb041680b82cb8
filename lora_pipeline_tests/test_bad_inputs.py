"""Every kind of bad input, built for real in source batches and run through `lora-pipeline build`:
each is named in report.json's problems with the severity that blocks (error) or warns (warning)."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib

import numpy as np
from PIL import Image

from lora_pipeline_tests.test_cli import assert_one_line_error, cli

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
