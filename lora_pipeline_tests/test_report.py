import io
import json
from pathlib import Path

import pytest
from PIL import Image

from lora_pipeline.core.datasets.buckets import DEFAULT_BUCKETS, BucketSettings
from lora_pipeline.core.datasets.checks.contact_sheet import (
    BOX,
    CELL,
    COL_W,
    COLOURS,
    HEADER_H,
    MUTED,
    PAD,
    ROW_H,
    select_items,
    sheet_size,
)
from lora_pipeline.core.datasets.checks.report import to_plain, write_report
from lora_pipeline.core.datasets.checks.validation import validate_dataset
from lora_pipeline.core.datasets.problems import problem
from lora_pipeline.core.datasets.snapshot.manifest import read_snapshot_info

LINT = {"captions": 3, "oov_terms": {"glossy": 2}, "banned_hits": {}, "shared_captions": []}


def build(snap, picture, bad=True):
    """Three good pictures, plus (when `bad`) one too small and one truncated file."""
    for n in range(3):
        snap.add(f"good{n}.png", picture(20 + n, (128, 96)), f"hnd, shape {n}")
    if bad:
        snap.add("small.png", picture(30, (32, 32)), "hnd, small")
        buf = io.BytesIO()
        picture(31, (96, 96)).effect_spread(4).save(buf, "JPEG")
        snap.add("cut.jpg", buf.getvalue()[: len(buf.getvalue()) // 2], "hnd, cut")
    snap.check.tag_frequency = {snap.folder.split("/")[1]: {"hnd": 5, "shape 0": 1}}
    snap.check.lint = LINT
    if bad:  # a problem about the whole set names no file
        snap.check.problems.append(problem("", "few_images", "warning", "only a few images", "spec"))
    snap.finish()
    return validate_dataset(snap.root, snap.spec(min_side=64), snap.dir, snap.check)


def cell_origin(index, columns):
    return (index % columns) * COL_W, HEADER_H + (index // columns) * ROW_H


def test_report_json_has_the_contract_keys_and_blocks_on_errors(hand_snapshot, picture):
    result = build(hand_snapshot, picture)
    files = write_report(hand_snapshot.dir, result, hand_snapshot.check)

    assert files.report_json == hand_snapshot.dir / "report.json" and not files.passed
    report = json.loads(files.report_json.read_text())
    assert {"version", "counts", "problems", "buckets", "tag_frequency", "lint", "passed", "manifest_root"} <= set(
        report
    )
    assert report["version"] == "hand-v1" and report["passed"] is False
    assert report["manifest_root"] == read_snapshot_info(hand_snapshot.dir).manifest_root
    assert report["counts"]["images"] == 5 and report["counts"]["problems"] == {"error": 2, "warning": 1}
    for row in report["problems"]:
        assert set(row) == {"file", "code", "severity", "message", "scope"}
    assert {(p["file"], p["code"], p["severity"]) for p in report["problems"]} == {
        (f"{hand_snapshot.folder}/small.png", "too_small", "error"),
        (f"{hand_snapshot.folder}/cut.jpg", "truncated_image", "error"),
        ("", "few_images", "warning"),
    }
    assert report["lint"] == LINT and report["tag_frequency"] == {"2_hnd": {"hnd": 5, "shape 0": 1}}
    assert sum(b["count"] for b in report["buckets"]["histogram"]) == 4


def test_report_md_is_what_a_person_reads(hand_snapshot, picture):
    files = write_report(hand_snapshot.dir, build(hand_snapshot, picture), hand_snapshot.check)
    markdown = files.report_md.read_text()
    assert markdown == files.markdown
    assert markdown.startswith("# Dataset report: hand-v1\n\n**FAILED** (training is blocked): 2 errors, 1 warnings")
    for text in (
        "| warning | few_images | spec | only a few images |",
        "| error | too_small |",
        "| error | truncated_image |",
        "| 576x448 | 3 |",
        "| hnd | 5 |",
    ):
        assert text in markdown
    assert "**out-of-vocabulary terms**: glossy (2)" in markdown and "shows 5 of 5 images" in markdown


def test_a_clean_dataset_passes(hand_snapshot, picture):
    files = write_report(hand_snapshot.dir, build(hand_snapshot, picture, bad=False), hand_snapshot.check)
    assert files.passed and json.loads(files.report_json.read_text())["passed"] is True
    assert "**PASSED**: 0 errors, 0 warnings" in files.markdown and "## Problems (0)\n\nNone." in files.markdown


def test_contact_sheet_is_deterministic_with_outlines_and_placeholders(hand_snapshot, picture):
    result = build(hand_snapshot, picture)
    first = write_report(hand_snapshot.dir, result, hand_snapshot.check).contact_sheet.read_bytes()
    second = write_report(hand_snapshot.dir, result, hand_snapshot.check).contact_sheet.read_bytes()
    assert first == second

    sheet = Image.open(io.BytesIO(first))
    assert sheet.format == "PNG" and sheet.size == sheet_size(5, truncated=False)
    columns = sheet.width // COL_W
    order = sorted(result.infos)  # cells are in path order: cut.jpg, good0..2, small.png
    cut_x, cut_y = cell_origin(order.index(f"{hand_snapshot.folder}/cut.jpg"), columns)
    good_x, good_y = cell_origin(order.index(f"{hand_snapshot.folder}/good0.png"), columns)
    assert sheet.getpixel((cut_x + 2, cut_y + ROW_H // 2)) == COLOURS["error"]  # red outline
    assert sheet.getpixel((good_x + 2, good_y + ROW_H // 2)) == (255, 255, 255)  # no outline
    assert sheet.getpixel((cut_x + PAD + 40, cut_y + PAD + 40)) == MUTED  # the placeholder's cross
    assert sheet.getpixel((cut_x + PAD + 3, cut_y + PAD + CELL // 2)) == BOX


def test_beyond_the_limit_problem_images_are_shown_first_and_the_rest_counted(hand_snapshot, picture):
    result = build(hand_snapshot, picture)
    files = write_report(hand_snapshot.dir, result, hand_snapshot.check, max_images=3)
    assert Image.open(files.contact_sheet).size == sheet_size(3, truncated=True)
    captions = hand_snapshot.check.captions
    shown = [Path(item.path).name for item in select_items(hand_snapshot.dir, result, captions, 3)]
    assert shown == ["cut.jpg", "good0.png", "small.png"]
    assert "shows 3 of 5 images" in files.markdown


def test_the_histogram_is_the_one_of_the_recipes_that_train_on_the_family(hand_snapshot, picture):
    build(hand_snapshot, picture, bad=False)  # three 128x96 pictures
    default = validate_dataset(hand_snapshot.root, hand_snapshot.spec(min_side=64), hand_snapshot.dir,
                               hand_snapshot.check)
    small = BucketSettings(resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)
    square = BucketSettings(resolution=96, enable_bucket=False)
    trained = validate_dataset(hand_snapshot.root, hand_snapshot.spec(min_side=64), hand_snapshot.dir,
                               hand_snapshot.check, buckets={"small-b": small, "small-a": small, "square": square})
    assert default.buckets["recipes"] == [] and default.buckets["resolution"] == DEFAULT_BUCKETS.resolution
    assert default.buckets["histogram"] == [{"width": 576, "height": 448, "count": 3}] and not default.other_buckets
    assert trained.buckets["recipes"] == ["small-a", "small-b"] and trained.buckets["resolution"] == 64
    assert trained.buckets["histogram"] == [{"width": 64, "height": 64, "count": 3}]  # kohya: first of a tie
    (other,) = trained.other_buckets
    assert other["recipes"] == ["square"] and other["histogram"] == [{"width": 96, "height": 96, "count": 3}]

    files = write_report(hand_snapshot.dir, trained, hand_snapshot.check)
    report = json.loads(files.report_json.read_text())
    assert report["buckets"]["recipes"] == ["small-a", "small-b"] and report["other_buckets"][0]["recipes"] == [
        "square"]
    assert "## Aspect-ratio buckets (resolution 64, step 16)" in files.markdown
    assert "`train_on` names this family: `small-a`, `small-b` (sides 32-128 px)." in files.markdown
    assert "| 64x64 | 3 |" in files.markdown and "| 96x96 | 3 |" in files.markdown
    default_md = write_report(hand_snapshot.dir, default, hand_snapshot.check).markdown
    assert "No recipe's `train_on` names this family: the recipe defaults (sides 256-1024 px)." in default_md


def test_to_plain_makes_json_ready_data():
    assert to_plain({"a": {3, 1}, "p": Path("x/y"), "t": (1, None)}) == {"a": [1, 3], "p": "x/y", "t": [1, None]}
    with pytest.raises(TypeError, match="cannot store a object"):
        to_plain(object())
