import io

import pytest
from PIL import Image

from lora_pipeline.core.datasets.checks.validation import validate_dataset
from lora_pipeline.core.datasets.problems import errors_in, problem
from lora_pipeline.core.errors import UserError

RED, BLUE = (200, 40, 40), (60, 60, 230)  # about the same brightness: same structure hash, different colour


def validate(snap, **checks):
    checks.setdefault("min_side", 64)
    return validate_dataset(snap.root, snap.spec(**checks), snap.dir, snap.check)


def found(result):
    return {(p["file"], p["code"], p["severity"]) for p in result.problems}


def test_every_check_reports_by_name_with_severity_scope_and_counts(hand_snapshot, picture):
    snap = hand_snapshot
    a = snap.add("a.png", picture(1, (128, 96)), "hnd, shapes")
    a_copy = snap.add("a_copy.png", (snap.dir / a).read_bytes(), "hnd, shapes again")
    b = snap.add("b.png", picture(2, (128, 128)), "hnd, b")
    b_small = snap.add("b_resized.jpg", picture(2, (128, 128)).resize((120, 120)), "hnd, b smaller", quality=75)
    red = snap.add("c_red.png", picture(3, (128, 128), colour=RED), "hnd, red")
    blue = snap.add("c_blue.png", picture(3, (128, 128), colour=BLUE), "hnd, blue", batch="b2")
    small = snap.add("small.png", picture(4, (40, 40)), "hnd, small")
    wide = snap.add("wide.png", picture(5, (256, 64)), "hnd, wide")
    buf = io.BytesIO()
    picture(6, (128, 128)).effect_spread(4).save(buf, "JPEG")
    cut = snap.add("cut.jpg", buf.getvalue()[: len(buf.getvalue()) // 2], "hnd, cut")
    uncaptioned = snap.add("quiet.png", picture(7, (128, 128)))
    (snap.dir / snap.folder / "ghost.txt").write_text("hnd, nobody", encoding="utf-8")
    scan = problem("notes/.DS_Store", "junk_skipped", "warning", "junk file skipped", "batch:b1")
    missing = problem(uncaptioned, "missing_caption", "error", "no caption: no sidecar", "dataset:hand-v1")
    snap.check.problems.append(missing)
    snap.finish(problems=[scan])

    result = validate(snap)

    scope = "dataset:hand-v1"
    assert {p["scope"] for p in result.problems} == {scope, "batch:b1"}
    assert found(result) == {
        ("notes/.DS_Store", "junk_skipped", "warning"),
        (uncaptioned, "missing_caption", "error"),
        (a_copy, "exact_duplicate", "warning"),
        (b_small, "near_duplicate", "warning"),
        (small, "too_small", "error"),
        (wide, "aspect_ratio", "error"),
        (cut, "truncated_image", "error"),
        (f"{snap.folder}/ghost.txt", "orphan_caption", "warning"),
    }
    messages = {p["code"]: p["message"] for p in result.problems}
    assert a in messages["exact_duplicate"] and "batch:b1/a_copy.png" in messages["exact_duplicate"]
    assert b in messages["near_duplicate"]
    assert "40x40" in messages["too_small"] and "4.00" in messages["aspect_ratio"]
    assert result.exact_duplicates == [(a_copy, a)] and [n[:2] for n in result.near_duplicates] == [(b_small, b)]
    # the recoloured pair has the same structure hash: only the colour check keeps it from being a duplicate
    assert (result.infos[red].dhash ^ result.infos[blue].dhash).bit_count() <= 6
    assert [p["severity"] for p in result.problems] == sorted(
        (p["severity"] for p in result.problems), key=lambda s: s != "error"
    )

    counts = result.counts
    assert (counts["images"], counts["captions"], counts["pairs"], counts["images_without_caption"]) == (10, 9, 9, 1)
    assert counts["orphan_captions"] == 1 and counts["decodable_images"] == 9 and counts["samples_per_epoch"] == 18
    assert counts["by_source"] == {"batch:b1": 9, "batch:b2": 1}
    assert counts["problems"] == {"error": 4, "warning": 4}
    assert not result.passed
    blocking = {p["code"] for p in errors_in(result.problems)}
    assert blocking == {"missing_caption", "too_small", "aspect_ratio", "truncated_image"}

    assert sum(b["count"] for b in result.buckets["histogram"]) == 9
    assert result.buckets["images"][wide] == [1024, 256] and result.buckets["images"][a] == [576, 448]
    assert cut not in result.buckets["images"]


@pytest.mark.parametrize("setting, expected", [("warn", {"warning"}), ("error", {"error"}), ("ignore", set())])
def test_near_duplicate_severity_follows_the_spec(hand_snapshot, picture, setting, expected):
    hand_snapshot.add("b.png", picture(2, (128, 128)), "hnd, b")
    hand_snapshot.add("b2.jpg", picture(2, (128, 128)).resize((122, 122)), "hnd, b again", quality=80)
    hand_snapshot.finish()
    result = validate(hand_snapshot, near_duplicates=setting)
    assert {p["severity"] for p in result.problems if p["code"] == "near_duplicate"} == expected
    assert result.passed is (setting != "error")


def test_a_clean_dataset_passes_with_pairs_and_buckets(hand_snapshot, picture):
    for n in range(3):
        hand_snapshot.add(f"{n}.png", picture(10 + n, (160, 120)), f"hnd, picture {n}")
    hand_snapshot.finish()
    result = validate(hand_snapshot)
    assert result.problems == [] and result.passed and errors_in(result.problems) == []
    assert result.counts["pairs"] == 3 and result.manifest_root
    assert result.buckets["histogram"] == [{"width": 576, "height": 448, "count": 3}]


def test_validating_a_broken_or_foreign_snapshot_is_a_user_error(hand_snapshot, picture, tmp_path):
    rel = hand_snapshot.add("a.png", picture(1), "hnd, a")
    hand_snapshot.finish()
    spec = hand_snapshot.spec(min_side=64)
    with pytest.raises(UserError, match="not the snapshot folder"):
        validate_dataset(hand_snapshot.root, spec, tmp_path, hand_snapshot.check)
    (hand_snapshot.dir / rel).unlink()
    with pytest.raises(UserError, match="listed in the manifest but missing"):
        validate_dataset(hand_snapshot.root, spec, hand_snapshot.dir, hand_snapshot.check)


def test_exif_rotation_decides_the_size_and_the_bucket_orientation(hand_snapshot, picture):
    exif = Image.Exif()
    exif[0x0112] = 8
    rel = hand_snapshot.add("phone.jpg", picture(1, (200, 100)), "hnd, phone", exif=exif)
    hand_snapshot.finish()
    result = validate(hand_snapshot)
    assert (result.infos[rel].width, result.infos[rel].height) == (100, 200)
    assert result.buckets["images"][rel] == [320, 704]  # portrait, not the stored landscape
