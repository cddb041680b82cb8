"""Dataset snapshots: copy-only, immutable, atomic, with provenance in every manifest row."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_pipeline.core.datasets.snapshot.manifest import (
    manifest_root,
    read_manifest,
    read_snapshot_info,
    verify_snapshot,
)
from lora_pipeline.core.datasets.snapshot.snapshot import build_snapshot, plan_snapshot
from lora_pipeline.core.datasets.snapshot.snapshot_plan import family, next_free_version
from lora_pipeline.core.datasets.spec import CaptionSpec, DatasetSpec, SourceRef
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_bytes
from lora_pipeline.core.paths import DataRoot
from lora_pipeline_tests.helpers import finish_version, make_read_only, tree_state

FOLDER = "img/10_hdaesth"


@pytest.fixture
def root(tmp_path: Path) -> DataRoot:
    return DataRoot(tmp_path / "data")


def spec_for(name: str, *sources: SourceRef, merge: bool = False, **fields: object) -> DatasetSpec:
    return DatasetSpec(name=name, trigger="hdaesth", repeats=10, sources=sources, merge=merge, **fields)


def test_build_copies_selected_images_with_full_rows_and_leaves_sources_untouched(
    root: DataRoot, make_batch, image_bytes, tmp_path: Path
) -> None:
    a, b = image_bytes(1, size=(40, 30)), image_bytes(2, "JPEG", size=(20, 50))
    make_batch(
        root,
        "b1",
        {
            "views/a.png": a,
            "views/a.txt": "hdaesth, front view",
            "b.jpg": b,
            "captions.csv": "file,caption\n",
            "notes.pdf": b"%PDF",
            ".DS_Store": b"junk",
            "raw/skip.png": image_bytes(3),
        },
    )
    (tmp_path / "outside.png").write_bytes(image_bytes(4))
    os.symlink(tmp_path / "outside.png", root.batch("b1") / "link.png")
    make_read_only(root.sources)
    before = tree_state(root.sources)
    spec = spec_for("hw-v1", SourceRef(batch="b1", exclude=("raw/*",)), captions=CaptionSpec(table="b1/captions.csv"))

    result = build_snapshot(root, spec, code_version="abc123")

    assert tree_state(root.sources) == before
    snap = root.dataset("hw-v1")
    assert result.created and result.dir == snap and result.version == "hw-v1"
    rows = read_manifest(snap)
    assert rows == result.rows
    assert [r.path for r in rows] == [f"{FOLDER}/a.png", f"{FOLDER}/b.jpg"]
    row_a = rows[0]
    assert row_a.to_json_dict() == {
        "path": f"{FOLDER}/a.png",
        "kind": "image",
        "sha256": sha256_bytes(a),
        "bytes": len(a),
        "width": 40,
        "height": 30,
        "stored_width": 40,
        "stored_height": 30,
        "source_batch": "b1",
        "source_path": "views/a.png",
        "source_sha256": sha256_bytes(a),
        "origin_batch": "b1",
        "origin_path": "views/a.png",
        "origin_sha256": sha256_bytes(a),
    }
    assert (rows[1].width, rows[1].height) == (20, 50)
    files = sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if not p.is_dir())
    assert files == [f"{FOLDER}/a.png", f"{FOLDER}/b.jpg", "manifest.jsonl", "snapshot.json"]
    for rel in (f"{FOLDER}/a.png", f"{FOLDER}/b.jpg"):
        st = (snap / rel).lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and stat.S_IMODE(st.st_mode) == 0o444
    src_inodes = {v[3] for v in before.values()}
    assert not src_inodes & {p.lstat().st_ino for p in snap.rglob("*")}

    info = read_snapshot_info(snap)
    assert info.version == "hw-v1" and info.code_version == "abc123"
    assert info.spec == json.loads(json.dumps(spec.resolved())) and info.spec_sha256 == spec.sha256
    assert info.manifest_root == info.image_root == manifest_root(rows) == result.manifest_root
    assert info.parents == [] and info.captions_complete is False
    assert info.sources[0].kind == "batch" and info.sources[0].name == "b1"
    assert info.created_at.endswith("+00:00")
    reported = {(p["file"], p["code"]) for p in info.problems}
    assert reported == {
        ("notes.pdf", "non_image_file"),
        (".DS_Store", "junk_skipped"),
        ("link.png", "symlink_not_followed"),
    }
    assert result.problems == info.problems
    assert sum(result.copy_methods.values()) == 2
    assert verify_snapshot(snap).ok


def test_rebuild_is_a_noop_and_changes_are_refused(root: DataRoot, make_batch, image_bytes) -> None:
    make_batch(root, "b1", {"a.png": image_bytes(1), "b.png": image_bytes(2)})
    spec = spec_for("hw-v1", SourceRef(batch="b1"))
    first = build_snapshot(root, spec, "c1")
    snap_state = tree_state(first.dir)

    again = build_snapshot(root, spec, "c2")

    assert not again.created and again.manifest_root == first.manifest_root and again.rows == first.rows
    assert tree_state(first.dir) == snap_state
    assert read_snapshot_info(first.dir).code_version == "c1"

    changed = spec_for("hw-v1", SourceRef(batch="b1"), intent="now with a different intent")
    with pytest.raises(UserError) as err:
        build_snapshot(root, changed, "c2")
    message = str(err.value)
    assert message.startswith(str(root.spec_file("hw-v1")))
    assert "dataset version 'hw-v1' already exists with a different spec (or changed sources)" in message
    assert "versions are immutable" in message and "hw-v2" in message

    (root.batch("b1") / "a.png").write_bytes(image_bytes(9))  # a source file changed under the same spec
    with pytest.raises(UserError, match="already exists with a different spec .*source files changed"):
        build_snapshot(root, spec, "c2")
    assert tree_state(first.dir) == snap_state


def test_a_folder_that_is_not_a_finished_snapshot_is_never_overwritten(root: DataRoot, make_batch, image_bytes):
    make_batch(root, "b1", {"a.png": image_bytes(1)})
    (root.dataset("hw-v1")).mkdir(parents=True)
    (root.dataset("hw-v1") / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="without snapshot.json"):
        build_snapshot(root, spec_for("hw-v1", SourceRef(batch="b1")), "c")
    assert sorted(p.name for p in root.dataset("hw-v1").iterdir()) == ["keep.txt"]


def test_merge_rule(root: DataRoot, make_batch, image_bytes) -> None:
    make_batch(root, "b1", {"a.png": image_bytes(1)})
    make_batch(root, "b2", {"b.png": image_bytes(2)})
    for spec in (spec_for("hw-v1", SourceRef(batch="b1")), spec_for("other-v1", SourceRef(batch="b2"))):
        build_snapshot(root, spec, "c")
        finish_version(root, spec)
    mixed = spec_for("hw-v2", SourceRef(dataset="hw-v1"), SourceRef(dataset="other-v1"))
    with pytest.raises(UserError) as err:
        plan_snapshot(root, mixed)
    assert str(err.value) == (
        f"{root.spec_file('hw-v2')}: sources mix dataset families hw and other; "
        "set merge: true to merge on purpose, or make an independent version"
    )
    merged = build_snapshot(root, spec_for("hw-v2", *mixed.sources, merge=True), "c")
    assert [r.path for r in merged.rows] == [f"{FOLDER}/a.png", f"{FOLDER}/b.png"]
    assert read_snapshot_info(merged.dir).parents == ["hw-v1", "other-v1"]
    # batches alone never need merge, whatever the name
    assert len(build_snapshot(root, spec_for("third", SourceRef(batch="b1"), SourceRef(batch="b2")), "c").rows) == 2


def test_collisions_are_renamed_deterministically_and_recorded(root: DataRoot, make_batch, image_bytes) -> None:
    make_batch(root, "b1", {"a.png": image_bytes(1), "x/A.jpg": image_bytes(2, "JPEG")})
    make_batch(root, "b2", {"a.png": image_bytes(3), "a__b2.png": image_bytes(4)})
    spec = spec_for("hw-v1", SourceRef(batch="b1"), SourceRef(batch="b2"))

    plan = plan_snapshot(root, spec)
    result = build_snapshot(root, spec, "c")

    by_source = {(r.source_batch, r.source_path): r for r in result.rows}
    assert by_source[("b1", "a.png")].path == f"{FOLDER}/a.png"
    assert by_source[("b1", "x/A.jpg")].path == f"{FOLDER}/A__b1.jpg"
    assert by_source[("b2", "a.png")].path == f"{FOLDER}/a__b2.png"
    assert by_source[("b2", "a__b2.png")].path == f"{FOLDER}/a__b2__b2.png"
    assert "renamed_from" not in by_source[("b1", "a.png")]
    assert by_source[("b1", "x/A.jpg")].renamed_from == "A.jpg"
    assert by_source[("b2", "a__b2.png")].renamed_from == "a__b2.png"
    collisions = sorted(p["file"] for p in result.problems if p["code"] == "basename_collision")
    assert collisions == sorted(by_source[k].path for k in [("b1", "x/A.jpg"), ("b2", "a.png"), ("b2", "a__b2.png")])
    assert [f.dest for f in plan.files] == [f.dest for f in plan_snapshot(root, spec).files]  # deterministic


def test_dataset_sources_carry_origin_through_generations(root: DataRoot, make_batch, image_bytes) -> None:
    a = image_bytes(1)
    make_batch(root, "b1", {"views/a.png": a})
    make_batch(root, "b2", {"views/a.png": image_bytes(2), "c.png": image_bytes(3)})
    for spec in (spec_for("hw-v1", SourceRef(batch="b1")),
                 spec_for("hw-v2", SourceRef(dataset="hw-v1"), SourceRef(batch="b2"))):
        build_snapshot(root, spec, "c")
        finish_version(root, spec)
    v3 = build_snapshot(root, spec_for("hw-v3", SourceRef(dataset="hw-v2", exclude=("c.png",))), "c")

    rows = {r.path: r for r in v3.rows}
    assert sorted(rows) == [f"{FOLDER}/a.png", f"{FOLDER}/a__b2.png"]
    original = rows[f"{FOLDER}/a.png"]
    assert original.source_dataset == "hw-v2" and "source_batch" not in original.to_json_dict()
    assert original.source_path == f"{FOLDER}/a.png" and original.source_sha256 == sha256_bytes(a)
    assert (original.origin_batch, original.origin_path, original.origin_sha256) == (
        "b1",
        "views/a.png",
        sha256_bytes(a),
    )
    renamed = rows[f"{FOLDER}/a__b2.png"]
    assert (renamed.source_path, renamed.origin_batch, renamed.origin_path) == (
        f"{FOLDER}/a__b2.png",
        "b2",
        "views/a.png",
    )
    assert read_snapshot_info(v3.dir).parents == ["hw-v2"]


def test_dataset_source_must_be_built_first(root: DataRoot, make_batch, image_bytes) -> None:
    with pytest.raises(UserError, match="source dataset 'hw-v1' is not built yet; build it first"):
        plan_snapshot(root, spec_for("hw-v2", SourceRef(dataset="hw-v1")))
    with pytest.raises(UserError, match="cannot be a source of itself"):
        plan_snapshot(root, spec_for("hw-v2", SourceRef(dataset="hw-v2")))
    make_batch(root, "b1", {"notes.md": "no images"})
    with pytest.raises(UserError, match="no images selected"):
        plan_snapshot(root, spec_for("hw-v1", SourceRef(batch="b1")))


def test_next_free_version_and_family(root: DataRoot) -> None:
    assert family("hw-aesthetic-v12") == "hw-aesthetic" and family("plain") == "plain"
    assert next_free_version(root, "hw") == "hw-v2"
    root.specs.mkdir(parents=True)
    (root.specs / "hw-v3.yaml").write_text("")
    root.dataset("hw-v4").mkdir(parents=True)
    assert next_free_version(root, "hw-v2") == "hw-v5"
    assert next_free_version(root, "other-v7") == "other-v8"


KILL_SCRIPT = """
import sys
from pathlib import Path
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.datasets.snapshot.snapshot import build_snapshot
from lora_pipeline.core.datasets.spec import DatasetSpec, SourceRef
spec = DatasetSpec(name="big-v1", trigger="t", repeats=1, sources=(SourceRef(batch="big"),))
build_snapshot(DataRoot(Path(sys.argv[1])), spec, "c")
"""


def test_a_killed_build_leaves_no_version_and_the_next_build_succeeds(root: DataRoot, make_batch) -> None:
    payload = os.urandom(200_000)
    make_batch(root, "big", {f"{i:03d}.png": bytes([i % 256]) + payload for i in range(300)})
    child = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(root.root)])
    deadline = time.monotonic() + 60
    while not list(root.datasets.glob(".big-v1.tmp-*")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the build finished before it could be interrupted"
    assert list(root.datasets.glob(".big-v1.tmp-*")), "killed mid-build: its staging folder is left behind"
    assert not root.dataset("big-v1").exists()

    result = build_snapshot(root, DatasetSpec(name="big-v1", trigger="t", repeats=1, sources=(SourceRef("big"),)), "c")

    assert result.created and len(result.rows) == 300
    assert not list(root.datasets.glob(".big-v1.tmp-*"))
    assert verify_snapshot(result.dir).ok


def test_include_exclude_globs_are_case_insensitive_on_path_or_basename(root: DataRoot, make_batch, image_bytes):
    make_batch(root, "b1", {"views/a.PNG": image_bytes(1), "views/b.jpg": image_bytes(2), "c.png": image_bytes(3)})
    plan = plan_snapshot(root, spec_for("hw-v1", SourceRef(batch="b1", include=("*.png",), exclude=("C.*",))))
    assert [f.source_path for f in plan.files] == ["views/a.PNG"]
    plan = plan_snapshot(root, spec_for("hw-v1", SourceRef(batch="b1", include=("views/*",))))
    assert [f.source_path for f in plan.files] == ["views/a.PNG", "views/b.jpg"]


def test_a_tampered_source_dataset_is_refused(root: DataRoot, make_batch, image_bytes) -> None:
    make_batch(root, "b1", {"a.png": image_bytes(1)})
    v1 = build_snapshot(root, spec_for("hw-v1", SourceRef(batch="b1")), "c").dir
    finish_version(root, spec_for("hw-v1", SourceRef(batch="b1")))
    copied = v1 / FOLDER / "a.png"
    copied.chmod(0o644)
    copied.write_bytes(image_bytes(2))
    with pytest.raises(UserError, match="no longer matches the manifest of dataset 'hw-v1'"):
        build_snapshot(root, spec_for("hw-v2", SourceRef(dataset="hw-v1")), "c")
    assert not root.dataset("hw-v2").exists() and not list(root.datasets.glob(".hw-v2.tmp-*"))


def test_manifest_sizes_are_the_sizes_training_sees_after_exif_orientation(root: DataRoot, make_batch) -> None:
    from PIL import Image

    from lora_pipeline.core.datasets.images import load_rgb
    from lora_pipeline.core.datasets.sources.batches import batch_manifest, scan_batch
    from lora_pipeline.core.datasets.sources.hashcache import RACY_NS

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80x60, shown turned by 90 degrees
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (10, 120, 200)).save(buf, "JPEG", exif=exif)
    make_batch(root, "b1", {"turned.jpg": buf.getvalue()})
    make_batch(root, "b2", {"turned.jpg": buf.getvalue()})
    time.sleep(RACY_NS / 1e9 + 0.2)
    batch_manifest(scan_batch(root, "b2"))  # b2's sizes come from the hash cache, b1's from the copy
    for batch, hashed in (("b1", 1), ("b2", 0)):
        result = build_snapshot(root, spec_for(f"{batch}-v1", SourceRef(batch=batch)), "c")
        assert result.hashed == hashed
        row = result.rows[0]
        assert (row.width, row.height, row.stored_width, row.stored_height) == (60, 80, 80, 60)
        assert load_rgb(result.dir / row.path).size == (row.width, row.height)
    finish_version(root, spec_for("b1-v1", SourceRef(batch="b1")))
    reused = build_snapshot(root, spec_for("b1-v2", SourceRef(dataset="b1-v1")), "c").rows[0]
    assert (reused.width, reused.height, reused.stored_width, reused.stored_height) == (60, 80, 80, 60)
