"""Captions reviewed by people (core/datasets/captions/review*.py, overrides.py): export a version's captions to a
CSV, edit it as a person would, import it as a caption batch and build the version that layers it, through the
command line a user runs; refusals are one line naming the row; the source batch is never touched."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lora_pipeline.core.datasets.captions.review_io import export_captions, import_captions
from lora_pipeline.core.datasets.snapshot.manifest import SEALED_FILES, read_manifest
from lora_pipeline.core.datasets.snapshot.seal import read_seal
from lora_pipeline.core.datasets.spec import load_spec
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import REVIEW_PAGE
from lora_pipeline_tests.helpers import assert_one_line_error, cli, tree_state

VERSION = "hardware-design-aesthetic-v1"  # batch curated-2026-10, sidecar captions
EDITS = {  # snapshot image -> the reviewed caption
    "img/10_hdaesth/cur-01-sage.png": "hdaesth, three-quarter view, sage green body, glossy finish, "
    "dome lid, lit round screen, two buttons",
    "img/10_hdaesth/cur-02-coral.png": "hdaesth, front view, coral red body, glossy finish, flat lid, dark wide screen",
    "img/10_hdaesth/cur-03-slate.png": "hdaesth, side view, slate blue body, matte finish, "
    "transparent reservoir, dark wide screen, two buttons",
}


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _captions(root, version: str) -> dict[str, tuple[str, str]]:
    """{image: (caption text, caption_source)} of a built version."""
    folder = root.dataset(version)
    return {
        r.image: ((folder / r.path).read_text().strip(), r.caption_source)
        for r in read_manifest(folder)
        if r.kind == "caption"
    }


def _images(root, version: str) -> set[tuple[str, str]]:
    return {(r.path, r.sha256) for r in read_manifest(root.dataset(version)) if r.kind == "image"}


def test_caption_round_trip_changes_exactly_the_edited_captions_and_never_the_source_batch(sample_root, tmp_path):
    cli("build", VERSION)
    sources_before = tree_state(sample_root.sources)
    review = tmp_path / "review" / "captions.csv"
    exported = json.loads(cli("captions", "export", VERSION, "--to", str(review), "--json").stdout)
    assert exported["rows"] == 8
    rows = _read(review)
    assert list(rows[0]) == ["version", "image", "caption", "source", "findings", "thumbnail"]
    by_image = {row["image"]: row for row in rows}
    assert by_image["img/10_hdaesth/cur-01-sage.png"]["source"] == "sidecar:curated-2026-10/cur-01-sage.txt"
    assert all((review.parent / row["thumbnail"]).is_file() for row in rows)  # relative to the CSV
    assert_one_line_error(cli("captions", "export", VERSION, "--to", str(review), check=False), "already exists")

    for image, caption in EDITS.items():
        by_image[image]["caption"] = caption
    _write(review, rows)
    imported = json.loads(cli("captions", "import", str(review), "--batch", "review-2026-12", "--json").stdout)
    new = imported["new_version"]
    assert imported["edited"] == 3 and new == "hardware-design-aesthetic-v3"  # v2 is taken by the sample spec
    assert load_spec(sample_root.spec_file(new)).captions.overrides == ("batch:review-2026-12",)
    cli("build", new)

    old, reviewed = _captions(sample_root, VERSION), _captions(sample_root, new)
    assert set(old) == set(reviewed)
    changed = {image for image in old if old[image][0] != reviewed[image][0]}
    assert changed == set(EDITS)
    for image, caption in EDITS.items():
        origin = Path(image).name.replace(".png", ".txt")
        assert reviewed[image] == (caption, f"sidecar:review-2026-12/curated-2026-10/{origin}")
    assert all(reviewed[image] == old[image] for image in old if image not in EDITS)
    assert _images(sample_root, new) == _images(sample_root, VERSION)
    after = tree_state(sample_root.sources)
    assert {k: v for k, v in after.items() if not k.startswith("review-2026-12")} == sources_before


def test_import_refuses_unknown_rows_and_captions_the_lint_refuses_naming_the_row(sample_root, tmp_path):
    cli("build", VERSION)
    review = tmp_path / "captions.csv"
    export_captions(sample_root, VERSION, review)
    rows = _read(review)

    def refused(edit, *needles: str) -> None:
        edited = [dict(row) for row in rows]
        edit(edited)
        path = tmp_path / "edited.csv"
        _write(path, edited)
        with pytest.raises(UserError) as caught:
            import_captions(sample_root, path, "review-x")
        assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)
        for needle in needles:
            assert needle in str(caught.value)
        assert (
            not sample_root.batch("review-x").exists()
            and not sample_root.spec_file("hardware-design-aesthetic-v3").exists()
        )

    refused(lambda r: r[4].update(image="img/10_hdaesth/nope.png"), "row 6: image 'img/10_hdaesth/nope.png' is not")
    refused(lambda r: r[2].update(caption="front view, hdaesth, teal body"), "row 4: the caption must start with")
    refused(lambda r: r[7].update(caption="hdaesth, front view, appliance"), "row 9: banned_word")
    refused(lambda r: r.append(dict(r[0])), "row 10: image", "already has row 2")
    refused(lambda r: None, "no caption differs")
    with pytest.raises(UserError, match="in transit"):
        import_captions(sample_root, review, "review-x.part")
    with pytest.raises(UserError, match="matches the source glob"):
        sample_root.spec_file("glob-v1").write_text(
            "name: glob-v1\ntrigger: hdaesth\nrepeats: 1\nsources: [{batch: 'curated-*'}]\n"
        )
        glob_csv = tmp_path / "glob.csv"
        _write(glob_csv, [{**rows[0], "version": "glob-v1"}])
        import_captions(sample_root, glob_csv, "curated-review")


def test_the_review_page_is_sealed_beside_the_report(sample_root):
    batch = sample_root.batch("curated-2026-10")
    (batch / "cur-04-cream.txt").chmod(0o644)
    (batch / "cur-04-cream.txt").write_text("hdaesth, top view, appliance, glossy finish\n")  # a banned word
    cli("build", VERSION, check=False)
    folder = sample_root.dataset(VERSION)
    page = (folder / REVIEW_PAGE).read_text()
    assert REVIEW_PAGE in SEALED_FILES and REVIEW_PAGE in read_seal(folder)["files"]
    assert page.count("<tr data-findings=") == 8
    assert '<tr data-findings="banned_word' in page and 'src="img/10_hdaesth/cur-04-cream.png"' in page
