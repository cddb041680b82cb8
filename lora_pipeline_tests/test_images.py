import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from lora_pipeline.core.datasets.checks.inspection import POOL_THRESHOLD, inspect_images
from lora_pipeline.core.datasets.images import inspect_image, load_rgb

MAX = 10_000_000


def codes(info):
    return {(p.code, p.severity) for p in info.problems}


def encoded(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def forged_png(width, height):
    """A PNG whose IHDR claims width x height but which holds no pixel data at all."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_a_good_rgb_jpeg_has_size_format_and_hash_and_no_problems(tmp_path, picture):
    path = tmp_path / "good.jpg"
    picture(1, (120, 80)).save(path, quality=95)
    info = inspect_image(path, MAX)
    assert (info.format, info.width, info.height, info.mode, info.bit_depth) == ("JPEG", 120, 80, "RGB", 8)
    assert info.problems == () and info.decoded and info.exif_orientation == 1 and not info.has_alpha
    assert isinstance(info.dhash, int) and 0 <= info.dhash < 2**64 and len(info.colour_signature) == 48


@pytest.mark.parametrize(
    "name, content, code",
    [
        ("empty.png", b"", "zero_byte"),
        ("notes.png", b"these are my notes, not a picture\n" * 20, "not_an_image"),
        ("header.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "truncated_image"),
    ],
)
def test_unreadable_files_are_errors_without_hash(tmp_path, name, content, code):
    path = tmp_path / name
    path.write_bytes(content)
    info = inspect_image(path, MAX)
    assert codes(info) == {(code, "error")}
    assert not info.decoded and info.dhash is None


@pytest.mark.parametrize("fmt, suffix", [("JPEG", "jpg"), ("PNG", "png")])
def test_files_cut_short_are_truncated_images(tmp_path, picture, fmt, suffix):
    data = encoded(picture(2, (128, 128)).effect_spread(3), fmt)
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[: len(data) // 2])
    info = inspect_image(path, MAX)
    assert codes(info) == {("truncated_image", "error")}
    assert (info.width, info.height) == (128, 128)  # the header was still readable
    assert info.dhash is None


def test_truncation_is_caught_even_when_pillow_is_set_to_tolerate_it(tmp_path, picture):
    data = encoded(picture(3, (128, 128)).effect_spread(3), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        assert ("truncated_image", "error") in codes(inspect_image(path, MAX))
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for the code that set it
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000)).save(path)
    assert path.stat().st_size < 100_000
    limit_before = Image.MAX_IMAGE_PIXELS
    info = inspect_image(path, max_pixels=1_000_000)
    assert codes(info) == {("decompression_bomb", "error")}
    assert (info.width, info.height) == (10_000, 10_000) and info.dhash is None
    assert "100,000,000 pixels" in info.problems[0].message
    assert limit_before == Image.MAX_IMAGE_PIXELS


def test_a_header_beyond_the_largest_limit_a_spec_can_set_is_a_decompression_bomb(tmp_path):
    path = tmp_path / "forged.png"
    path.write_bytes(forged_png(100_000, 100_000))
    info = inspect_image(path, max_pixels=1_000_000_000)  # ChecksSpec.max_pixels' upper bound
    assert codes(info) == {("decompression_bomb", "error")}


def test_exif_orientation_reports_the_rotated_size(tmp_path, picture):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    picture(4, (60, 30)).save(path, exif=exif)
    info = inspect_image(path, MAX)
    assert (info.raw_width, info.raw_height) == (60, 30)
    assert (info.width, info.height) == (30, 60)
    assert info.exif_orientation == 6
    assert load_rgb(path).size == (30, 60)


def _cmyk():
    return Image.new("CMYK", (32, 32), (0, 0, 0, 0))


def _i16():
    return Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))


def _rgba():
    im = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))
    return im


def _palette_transparent():
    im = Image.new("P", (32, 32), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.info["transparency"] = 0
    return im


@pytest.mark.parametrize(
    "make, suffix, phrase, corner",
    [
        (_cmyk, "jpg", "CMYK; training converts it to RGB", (255, 255, 255)),
        (_i16, "png", "16-bit grayscale (I;16); training scales it to 8-bit", (128, 128, 128)),
        (_rgba, "png", "composites it on a white background", (255, 255, 255)),
        (_palette_transparent, "png", "palette transparency; training composites", (255, 255, 255)),
        (lambda: Image.new("P", (32, 32), 0), "png", "palette image (P); training converts it to RGB", (0, 0, 0)),
        (lambda: Image.new("L", (32, 32), 77), "png", "grayscale (L)", (77, 77, 77)),
        (lambda: Image.new("1", (32, 32), 1), "png", "1-bit black and white", (255, 255, 255)),
        (lambda: Image.new("LA", (32, 32), (0, 0)), "png", "an alpha channel (LA)", (255, 255, 255)),
    ],
)
def test_colour_modes_say_how_training_converts_them_and_load_rgb_does_it(tmp_path, make, suffix, phrase, corner):
    path = tmp_path / f"mode.{suffix}"
    make().save(path)
    info = inspect_image(path, MAX)
    notes = [p for p in info.problems if p.code == "colour_mode"]
    assert len(notes) == 1 and notes[0].severity == "warning" and phrase in notes[0].message, info.problems
    assert info.decoded and info.dhash is not None
    rgb = load_rgb(path)
    assert rgb.mode == "RGB" and np.asarray(rgb).dtype == np.uint8
    assert rgb.getpixel((0, 0)) == corner


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 257, 65535, 1000]], dtype=np.uint16)).save(path)
    assert inspect_image(path, MAX).bit_depth == 16
    assert [load_rgb(path).getpixel((x, 0))[0] for x in range(4)] == [0, 1, 255, 4]
    wide = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0, 65535, 70000, -5]], dtype=np.int32)).save(wide)
    assert "clips it to 0-65535" in inspect_image(wide, MAX).problems[0].message
    assert [load_rgb(wide).getpixel((x, 0))[0] for x in range(4)] == [0, 255, 255, 0]


def test_extension_mismatch_and_animation_are_warnings(tmp_path, picture):
    path = tmp_path / "really_png.jpg"
    picture(5).save(path, format="PNG")
    assert ("extension_mismatch", "warning") in codes(inspect_image(path, MAX))
    gif = tmp_path / "moving.gif"
    picture(6).save(gif, save_all=True, append_images=[picture(7)], duration=100)
    info = inspect_image(gif, MAX)
    assert ("animated", "warning") in codes(info) and info.frames == 2


def test_perceptual_hash_survives_reencoding_and_resizing_but_tells_pictures_apart(tmp_path, picture):
    original, other = picture(8, (200, 160)), picture(9, (200, 160))
    original.save(tmp_path / "a.png")
    original.resize((190, 152), Image.Resampling.LANCZOS).save(tmp_path / "a_small.jpg", quality=70)
    other.save(tmp_path / "b.png")
    a, a_small, b = (inspect_image(tmp_path / n, MAX).dhash for n in ("a.png", "a_small.jpg", "b.png"))
    assert (a ^ a_small).bit_count() <= 6
    assert (a ^ b).bit_count() > 12


def test_inspect_images_uses_worker_processes_and_keeps_order(tmp_path, picture):
    paths = []
    for n in range(POOL_THRESHOLD + 4):
        path = tmp_path / f"{n:03d}.png"
        picture(n, (48, 40)).save(path)
        paths.append(path)
    (tmp_path / "000.png").write_bytes(b"")
    infos = inspect_images(paths, MAX, workers=2)
    assert [i.path for i in infos] == [str(p) for p in paths]
    assert codes(infos[0]) == {("zero_byte", "error")}
    assert infos[1:] == [inspect_image(p, MAX) for p in paths[1:]]
