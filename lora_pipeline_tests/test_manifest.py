"""manifest.jsonl / snapshot.json: atomic writes, reading, and re-verifying a snapshot against its manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lora_pipeline.core.datasets.checks.report import read_report
from lora_pipeline.core.datasets.snapshot.manifest import (
    manifest_root,
    read_manifest,
    read_snapshot_info,
    verify_snapshot,
    write_manifest,
    write_snapshot_info,
)
from lora_pipeline.core.datasets.snapshot.snapshot import build_snapshot
from lora_pipeline.core.datasets.spec import DatasetSpec, SourceRef, load_spec
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_text, read_json, write_json
from lora_pipeline.core.hashing import merkle_root, sha256_file
from lora_pipeline.core.paths import MANIFEST, REPORT_JSON, SNAPSHOT, DataRoot
from lora_pipeline_tests.helpers import finish_version

FOLDER = "img/10_hdaesth"


@pytest.fixture
def snapshot(tmp_path: Path, make_batch, image_bytes) -> Path:
    root = DataRoot(tmp_path / "data")
    make_batch(root, "b1", {f"{i}.png": image_bytes(i) for i in range(3)})
    spec = DatasetSpec(name="hw-v1", trigger="hdaesth", repeats=10, sources=(SourceRef(batch="b1"),))
    return build_snapshot(root, spec, "c").dir


def test_untouched_snapshot_verifies(snapshot: Path) -> None:
    result = verify_snapshot(snapshot)
    assert result.ok and result.files_checked == 3 and result.problems() == []


def test_flipped_byte_is_caught(snapshot: Path) -> None:
    path = snapshot / FOLDER / "1.png"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    result = verify_snapshot(snapshot)
    assert not result.ok and result.mismatched == [f"{FOLDER}/1.png"]
    assert result.problems() == [f"hw-v1/{FOLDER}/1.png: content changed (sha256 differs from manifest)"]


def test_deleted_and_added_files_are_caught(snapshot: Path) -> None:
    (snapshot / FOLDER / "0.png").unlink()
    (snapshot / FOLDER / "extra.png").write_bytes(b"stowaway")
    result = verify_snapshot(snapshot)
    assert result.missing == [f"{FOLDER}/0.png"] and result.extra == [f"{FOLDER}/extra.png"]
    assert not result.mismatched and not result.ok


def test_symlink_in_place_of_a_file_counts_as_missing(snapshot: Path) -> None:
    path = snapshot / FOLDER / "2.png"
    target = snapshot.parent / "elsewhere.png"
    target.write_bytes(path.read_bytes())
    path.unlink()
    os.symlink(target, path)
    assert verify_snapshot(snapshot).missing == [f"{FOLDER}/2.png"]


def test_edited_manifest_no_longer_matches_the_root(snapshot: Path) -> None:
    manifest = snapshot / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[1:]))  # drop a row: the root changes and the file becomes "extra"
    result = verify_snapshot(snapshot)
    assert result.root_mismatch and len(result.extra) == 1 and not result.ok


def test_write_manifest_sorts_rows_and_returns_their_root(tmp_path: Path) -> None:
    rows = [{"path": p, "kind": "image", "sha256": p * 2, "bytes": len(p)} for p in ("b", "a", "c")]
    root = write_manifest(tmp_path, rows)
    assert root == merkle_root(rows)
    assert [r.path for r in read_manifest(tmp_path)] == ["a", "b", "c"]


def test_atomic_writes_leave_no_temp_files_and_can_be_read_only(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.json"
    write_json(target, {"b": 1, "a": [1]})
    assert read_json(target) == {"a": [1], "b": 1}
    atomic_write_text(target, "again\n", readonly=True)
    assert target.read_text() == "again\n" and (target.stat().st_mode & 0o777) == 0o444
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.json"]


def test_reading_broken_files_names_them(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.jsonl").write_text('{"path": "a"}\nnot json\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match=r"bad.json: invalid JSON"):
        read_json(tmp_path / "bad.json")


# sha256 of manifest.jsonl and the manifest root of every committed sample version, as built before the rows were
# typed (`ManifestRow`): the records must write the same bytes.
SAMPLE_MANIFESTS = {
    "hardware-curated-v1": ("4858bfd6cf9a38d4f2a4302bb23d29938f63b226fa3a90a55b7bbf8211607897",
                            "397ca27ad7b2620d6282fbbf5289cacedcfddabc50e8713d990dba83f2f3671c"),
    "hardware-design-aesthetic-v1": ("4858bfd6cf9a38d4f2a4302bb23d29938f63b226fa3a90a55b7bbf8211607897",
                                     "397ca27ad7b2620d6282fbbf5289cacedcfddabc50e8713d990dba83f2f3671c"),
    "hardware-design-aesthetic-v2": ("b37a8a32e8850a7116cfd8c94093efb4a3beac6c129abea2613d47564c850c27",
                                     "295fe8f81eb76c6fd5d95079fc6f7cb5e644abce9d6ae83f56d7194c5bee1555"),
    "hardware-masked-reg-v1": ("ca938bea8a026bad2c9ed198c868f1181b43908a58c9533acb4aed4deca5175f",
                               "6fb683b844feb2329ab36e0553d6b41e33abf66277a3fb8499f02b2851096f24"),
    "hardware-promoted-merge-v1": ("5ed2233f14b216d29af792749fdcdff98d8837cb310be29a8e2a4722dc47acfc",
                                   "36679b23b764684592bcb2e6d48e7ed2abac57ed0cf12995a695e058fd3542fa"),
}


def test_the_sample_versions_files_are_written_as_before_and_read_back_byte_for_byte(sample_root, tmp_path) -> None:
    """Every kind of row (images from batches and from a version, captions, masks, class images and their
    captions) and snapshot.json and report.json: built, read as records and written again, the same bytes."""
    for version, (manifest_sha, root_hash) in SAMPLE_MANIFESTS.items():  # dict order: sources before reusers
        spec = load_spec(sample_root.spec_file(version))
        build_snapshot(sample_root, spec, "c")
        finish_version(sample_root, spec)
        snap, again = sample_root.dataset(version), tmp_path / version
        again.mkdir()
        assert (sha256_file(snap / MANIFEST), read_snapshot_info(snap).manifest_root) == (manifest_sha, root_hash)

        assert write_manifest(again, read_manifest(snap)) == manifest_root(read_manifest(snap)) == root_hash
        write_snapshot_info(again, read_snapshot_info(snap))
        write_json(again / REPORT_JSON, read_report(snap).to_json_dict())
        for name in (MANIFEST, SNAPSHOT, REPORT_JSON):
            assert (again / name).read_bytes() == (snap / name).read_bytes(), f"{version}/{name}"


def test_a_row_keeps_exactly_its_keys_and_their_json_types(tmp_path: Path) -> None:
    image = {"path": "img/1_x/a.png", "kind": "image", "sha256": "a" * 64, "bytes": 10, "width": None,
             "height": None, "stored_width": None, "stored_height": None, "source_batch": "b1",
             "source_path": "A.png", "source_sha256": "a" * 64, "origin_batch": "b1", "origin_path": "A.png",
             "origin_sha256": "a" * 64, "renamed_from": "A.png", "mask": "alpha"}
    caption = {"path": "img/1_x/a.txt", "kind": "caption", "sha256": "c" * 64, "bytes": 5, "image": "img/1_x/a.png",
               "caption_source": "sidecar:b1/A.txt"}  # no source_*: only the keys given are written
    write_manifest(tmp_path, [caption, image])
    lines = [json.dumps(image, sort_keys=True, ensure_ascii=False), json.dumps(caption, sort_keys=True)]
    assert (tmp_path / MANIFEST).read_text() == "".join(line + "\n" for line in lines)
    assert [row.to_json_dict() for row in read_manifest(tmp_path)] == [image, caption]
    assert read_manifest(tmp_path)[0].recorded_size == (None, None, None, None)
    assert read_manifest(tmp_path)[1].recorded_size is None  # no stored size recorded


@pytest.mark.parametrize(("line", "message"), [
    ('{"path": "a", "kind": "image", "sha256": "s", "bytes": 1, "colour": "red"}', "line 2: colour: unknown field"),
    ('{"path": "a", "kind": "image", "sha256": "s", "bytes": "1"}', "line 2: bytes: expected a whole number"),
    ('{"path": "a", "kind": "picture", "sha256": "s", "bytes": 1}', "line 2: kind: expected one of"),
    ('{"path": "a", "sha256": "s", "bytes": 1}', "line 2: kind: required field is missing"),
])
def test_a_line_that_is_not_a_manifest_row_is_one_line_naming_file_and_line(tmp_path: Path, line, message) -> None:
    good = '{"path": "b", "kind": "caption", "sha256": "s", "bytes": 1, "image": "a"}'
    atomic_write_text(tmp_path / MANIFEST, f"{good}\n{line}\n")
    with pytest.raises(UserError) as err:
        read_manifest(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / MANIFEST}: {message}") and "\n" not in str(err.value)
