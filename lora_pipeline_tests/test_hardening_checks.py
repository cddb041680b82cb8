"""Dataset checks that held a wrong input for a traceback or for a clean report (issue 27): a mask or an alpha
image whose header claims 20000x20000 pixels, a spec's max_pixels above Pillow's own limit, and a version of
regularisation images only."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_pipeline.core.datasets.images import PixelLimitError, inspect_image, open_limited
from lora_pipeline.core.datasets.snapshot.snapshot import build_snapshot
from lora_pipeline.core.datasets.spec import ChecksSpec, DatasetSpec, SourceRef
from lora_pipeline.core.paths import DataRoot
from lora_pipeline_tests.helpers import finish_version

GREY, RGBA = 0, 6  # PNG colour types
PILLOW_REFUSES = 2 * 89_478_485  # Pillow's own DecompressionBombError threshold (178,956,970 pixels)


def png_header(width: int, height: int, colour_type: int) -> bytes:
    """A PNG whose header claims `width` x `height` and whose pixel data is far too short: nothing a check that
    refuses on the header ever decodes (a real 20000x20000 mask compresses to a few hundred KB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def spec(name: str, *sources: SourceRef, max_pixels: int = 64_000_000) -> DatasetSpec:
    return DatasetSpec(name=name, trigger="trg", repeats=1, sources=sources,
                       checks=ChecksSpec(min_side=32, max_pixels=max_pixels))


def report_errors(root: DataRoot, version: str) -> dict[str, str]:
    report = json.loads((root.dataset(version) / "report.json").read_text())
    assert not report["passed"]
    return {p["file"].rsplit("/", 1)[-1]: f'{p["code"]}: {p["message"]}' for p in report["problems"]
            if p["severity"] == "error"}


@pytest.fixture
def root(tmp_path) -> DataRoot:
    return DataRoot(tmp_path / "data")


def test_a_mask_whose_header_claims_too_many_pixels_is_a_finding_not_a_traceback(root, make_batch, picture):
    white = Image.new("L", (64, 64), 255)
    make_batch(root, "bomb", {
        "ok.png": png(picture(1, (64, 64))), "ok.txt": "trg, fine", "ok.mask.png": png(white),
        "big.png": png(picture(2, (64, 64))), "big.txt": "trg, big mask",
        "big.mask.png": png_header(20_000, 20_000, GREY),
    })
    version = spec("bomb-v1", SourceRef(batch="bomb", masks="file"))
    build_snapshot(root, version, "c")
    seal = finish_version(root, version)  # Pillow raised DecompressionBombError here before the fix
    assert seal is not None and (root.dataset("bomb-v1") / "contact_sheet.png").is_file()
    errors = report_errors(root, "bomb-v1")
    assert errors == {"big.png": "mask_too_large: the mask is refused before decoding: header claims 20000x20000 "
                                 "= 400,000,000 pixels, above checks.max_pixels 64,000,000"}


def test_an_alpha_masked_image_that_claims_too_many_pixels_is_the_image_check_finding(root, make_batch, picture):
    rgba = picture(3, (64, 64)).convert("RGBA")
    make_batch(root, "alpha", {"a.png": png(rgba), "a.txt": "trg, fine",
                               "huge.png": png_header(20_000, 20_000, RGBA), "huge.txt": "trg, huge"})
    version = spec("alpha-v1", SourceRef(batch="alpha", masks="alpha"))
    build_snapshot(root, version, "c")
    finish_version(root, version)  # the alpha mask check raised DecompressionBombError here before the fix
    errors = report_errors(root, "alpha-v1")
    assert list(errors) == ["huge.png"] and errors["huge.png"].startswith("decompression_bomb: refused before")


def test_a_max_pixels_above_pillows_own_limit_takes_effect(tmp_path):
    claims = tmp_path / "wide.png"
    claims.write_bytes(png_header(15_000, 13_000, GREY))  # 195,000,000 pixels: above Pillow's 178,956,970
    assert PILLOW_REFUSES < 15_000 * 13_000
    # Within a spec's limit of 200M the file is opened (and then found damaged: its pixel data is cut short);
    # before the fix Pillow refused it as a decompression bomb whatever the spec said.
    codes = [p.code for p in inspect_image(claims, 200_000_000).problems]
    assert codes == ["truncated_image"]
    with open_limited(claims, 200_000_000) as im:
        assert im.size == (15_000, 13_000)
    # Below it, the one limit refuses images and masks alike, before decoding.
    assert [p.code for p in inspect_image(claims, 100_000_000).problems] == ["decompression_bomb"]
    with pytest.raises(PixelLimitError, match="above checks.max_pixels 100,000,000"), open_limited(claims, 100_000_000):
        pass
    assert Image.MAX_IMAGE_PIXELS == PILLOW_REFUSES // 2  # Pillow's setting is restored for everyone else


def test_a_version_of_regularisation_images_only_does_not_pass(root, make_batch, picture):
    make_batch(root, "classes", {f"c{i}.png": png(picture(30 + i, (64, 64))) for i in range(2)})
    version = spec("reg-only-v1", SourceRef(batch="classes", role="regularisation", class_tokens="gadget"))
    build_snapshot(root, version, "c")
    finish_version(root, version)
    errors = report_errors(root, "reg-only-v1")  # "0 errors" and passed before the fix
    assert errors == {"": "no_training_images: the version has no training images (only 2 regularisation "
                          "images): add a source with role: training"}
    assert np.asarray(Image.open(root.dataset("reg-only-v1") / "reg/1_gadget/c0.png")).any()


def test_pixel_limit_keeps_images_and_masks_as_they_were(tmp_path, picture):
    """The limit changes nothing for a file within it: the same pixels as a plain Pillow decode."""
    from lora_pipeline.core.datasets.images import load_rgb
    from lora_pipeline.core.datasets.masks import load_mask

    path = tmp_path / "p.png"
    path.write_bytes(png(picture(5, (48, 32)).convert("RGBA")))
    with Image.open(path) as im:
        plain = np.asarray(im.convert("RGB")), np.asarray(im.getchannel("A"))
    assert (np.asarray(load_rgb(path, 48 * 32)) == plain[0]).all()
    assert (np.asarray(load_mask(Path(path), True, 48 * 32)) == plain[1]).all()
