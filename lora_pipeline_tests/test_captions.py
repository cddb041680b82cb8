"""Caption sets: finding each snapshot image's caption, problems on the way, and writing the .txt files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from lora_pipeline.core.datasets.captions.caption_files import read_caption_text
from lora_pipeline.core.datasets.captions.captions import (
    CaptionPlan,
    load_caption_check,
    parse_caption_source,
    plan_captions,
    write_caption_check,
    write_captions,
)
from lora_pipeline.core.datasets.captions.tags import caption_path
from lora_pipeline.core.datasets.snapshot.manifest import manifest_root, read_manifest, write_manifest
from lora_pipeline.core.datasets.spec import CaptionSpec, DatasetSpec, SourceRef
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_bytes, sha256_file
from lora_pipeline.core.paths import DataRoot

IMG = b"\x89PNG fake image bytes"
FOLDER = "img/10_hdaesth"


@pytest.fixture
def root(tmp_path: Path) -> DataRoot:
    return DataRoot(tmp_path / "data")


def spec_for(*sources: SourceRef, name: str = "hw-v2", **captions: object) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        trigger="hdaesth",
        repeats=10,
        sources=sources or (SourceRef(batch="b1"),),
        captions=CaptionSpec(**captions),
    )


def put(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def batch_files(root: DataRoot, batch: str, files: dict[str, bytes | str]) -> None:
    for rel, data in files.items():
        put(root.batch(batch) / rel, data)
    put(root.batch(batch) / "_READY", "")


def snapshot(root: DataRoot, version: str, images: dict[str, tuple[str, str]]) -> Path:
    """A snapshot as snapshot.py leaves it: {basename: ("batch:<id>" | "dataset:<v>", source_path)}."""
    snap = root.dataset(version)
    rows = []
    for basename, (source, source_path) in images.items():
        kind, name = source.split(":")
        path = f"{FOLDER}/{basename}"
        put(snap / path, IMG)
        rows.append(
            {
                "path": path,
                "kind": "image",
                "sha256": sha256_bytes(IMG),
                "bytes": len(IMG),
                "width": 8,
                "height": 8,
                f"source_{kind}": name,
                "source_path": source_path,
                "source_sha256": sha256_bytes(IMG),
            }
        )
    write_manifest(snap, rows)
    return snap


def by_code(plan: CaptionPlan, code: str) -> dict[str, dict]:
    return {p["file"]: p for p in plan.problems if p["code"] == code}


def test_sidecars_orphans_and_missing(root: DataRoot) -> None:
    batch_files(
        root,
        "b1",
        {
            "views/a.png": IMG,
            "views/a.txt": "hdaesth, front view",
            "views/b.png": IMG,
            "views/c.png": IMG,
            "views/c.txt": "hdaesth, side view",
            "views/left-out.jpg": IMG,  # excluded by the spec's globs: its caption is no orphan
            "views/left-out.txt": "hdaesth, top view",
            "views/gone.txt": "hdaesth, back view",
            "views/._a.txt": b"\x00\x05\x16\x07 AppleDouble",
        },
    )
    snap = snapshot(
        root,
        "hw-v2",
        {
            "a.png": ("batch:b1", "views/a.png"),
            "b.png": ("batch:b1", "views/b.png"),
            "c.png": ("batch:b1", "views/c.png"),
        },
    )
    spec = spec_for(SourceRef(batch="b1", include=("*.png",)))
    plan = plan_captions(root, spec, snap)

    assert plan.captions == {f"{FOLDER}/a.png": "hdaesth, front view", f"{FOLDER}/c.png": "hdaesth, side view"}
    assert plan.caption_sources[f"{FOLDER}/a.png"] == "sidecar:b1/views/a.txt"
    assert plan.caption_source_sha256[f"{FOLDER}/a.png"] == sha256_file(root.batch("b1") / "views/a.txt")
    missing = by_code(plan, "missing_caption")
    assert list(missing) == [f"{FOLDER}/b.png"]
    assert missing[f"{FOLDER}/b.png"]["severity"] == "error"
    assert "b1/views/b.txt not found" in missing[f"{FOLDER}/b.png"]["message"]
    orphans = by_code(plan, "orphan_caption")
    assert list(orphans) == ["views/gone.txt"]
    assert orphans["views/gone.txt"] | {"message": ""} == {
        "file": "views/gone.txt",
        "code": "orphan_caption",
        "severity": "warning",
        "message": "",
        "scope": "batch:b1",
    }


def test_encodings_bom_latin1_and_crlf(root: DataRoot) -> None:
    batch_files(
        root,
        "b1",
        {
            "bom.png": IMG,
            "bom.txt": "\ufeffhdaesth, café finish".encode(),
            "latin.png": IMG,
            "latin.txt": "hdaesth, café finish".encode("latin-1"),
            "crlf.png": IMG,
            "crlf.txt": b"hdaesth,  front view\r\n",
            "multi.png": IMG,
            "multi.txt": b"hdaesth, front view\r\nmatte finish\r\n",
        },
    )
    names = ("bom", "latin", "crlf", "multi")
    snap = snapshot(root, "hw-v2", {f"{n}.png": ("batch:b1", f"{n}.png") for n in names})
    plan = plan_captions(root, spec_for(), snap)

    assert plan.captions == {
        f"{FOLDER}/bom.png": "hdaesth, café finish",
        f"{FOLDER}/crlf.png": "hdaesth, front view",
        f"{FOLDER}/multi.png": "hdaesth, front view, matte finish",
    }
    not_utf8 = by_code(plan, "caption_not_utf8")
    assert list(not_utf8) == ["latin.txt"]
    assert not_utf8["latin.txt"]["scope"] == "batch:b1"
    assert "0xe9" in not_utf8["latin.txt"]["message"]
    assert "missing_caption" not in {p["code"] for p in plan.problems}  # the file was found, just unreadable
    multiline = by_code(plan, "multiline_caption")
    assert list(multiline) == [f"{FOLDER}/multi.png"]
    assert multiline[f"{FOLDER}/multi.png"]["message"].endswith("(caption from sidecar:b1/multi.txt)")
    assert plan.lint["multiline"] == 1

    assert read_caption_text(root.batch("b1") / "bom.txt") == "hdaesth, café finish"
    with pytest.raises(UserError, match=r"latin\.txt: not UTF-8"):
        read_caption_text(root.batch("b1") / "latin.txt")
    with pytest.raises(UserError, match="nope.txt: caption file not found"):
        read_caption_text(root.batch("b1") / "nope.txt")


def test_table_rows_outside_orphans_and_duplicates(root: DataRoot) -> None:
    put(root.sources / "escape.png", IMG)
    batch_files(
        root,
        "b1",
        {
            "a.png": IMG,
            "views/b.png": IMG,
            "views/c.png": IMG,
            "excluded.jpg": IMG,
            "meta/captions.csv": (
                "file , caption\n"
                'a.png,"hdaesth, front view"\n'
                './views/b.png,"hdaesth, side view"\n'
                '../escape.png,"hdaesth, sneaky"\n'
                f'{root.batch("b1") / "a.png"},"hdaesth, absolute"\n'
                'views/gone.png,"hdaesth, gone"\n'
                'excluded.jpg,"hdaesth, left out on purpose"\n'
                'a.png,"hdaesth, again"\n'
                ',"hdaesth, nothing"\n'
            ),
        },
    )
    images = {n: ("batch:b1", p) for n, p in {"a.png": "a.png", "b.png": "views/b.png", "c.png": "views/c.png"}.items()}
    snap = snapshot(root, "hw-v2", images)
    plan = plan_captions(root, spec_for(source="table", table="meta/captions.csv"), snap)

    assert plan.captions == {f"{FOLDER}/a.png": "hdaesth, front view", f"{FOLDER}/b.png": "hdaesth, side view"}
    assert plan.caption_sources[f"{FOLDER}/b.png"] == "table:b1/meta/captions.csv#2"
    assert plan.caption_source_sha256[f"{FOLDER}/b.png"] == sha256_file(root.batch("b1") / "meta/captions.csv")
    outside = by_code(plan, "caption_path_outside_batch")
    assert set(outside) == {"../escape.png", str(root.batch("b1") / "a.png")}
    assert all(p["severity"] == "error" and p["scope"] == "batch:b1" for p in outside.values())
    assert list(by_code(plan, "orphan_caption")) == ["views/gone.png"]
    assert "rows 1 and 7" in by_code(plan, "duplicate_caption_row")["a.png"]["message"]
    assert "row 8" in by_code(plan, "table_row_without_file")["meta/captions.csv"]["message"]
    assert "has no row for 'views/c.png'" in by_code(plan, "missing_caption")[f"{FOLDER}/c.png"]["message"]


def test_jsonl_table_in_a_named_batch(root: DataRoot) -> None:
    batch_files(root, "b1", {"a.png": IMG})
    batch_files(
        root,
        "b2",
        {
            "d.png": IMG,
            "e.png": IMG,
            "captions.jsonl": (
                '{"file": "d.png", "caption": "hdaesth, glossy", "score": 3}\n\n'
                '{"file": "x.png", "caption": "x"}\n'
                '{"file": "e.png"}\n'
            ),
        },
    )
    images = {"a.png": ("batch:b1", "a.png"), "d.png": ("batch:b2", "d.png"), "e.png": ("batch:b2", "e.png")}
    snap = snapshot(root, "hw-v2", images)
    spec = spec_for(SourceRef(batch="b1"), SourceRef(batch="b2"), source="table", table="b2/captions.jsonl")
    plan = plan_captions(root, spec, snap)

    assert plan.captions == {f"{FOLDER}/d.png": "hdaesth, glossy", f"{FOLDER}/e.png": ""}
    assert "table:b2/captions.jsonl#3" in by_code(plan, "empty_caption")[f"{FOLDER}/e.png"]["message"]
    assert plan.caption_sources[f"{FOLDER}/d.png"] == "table:b2/captions.jsonl#1"
    assert "from batch 'b1'" in by_code(plan, "missing_caption")[f"{FOLDER}/a.png"]["message"]
    assert list(by_code(plan, "orphan_caption")) == ["x.png"]

    ambiguous = spec_for(SourceRef(batch="b1"), SourceRef(batch="b2"), source="table", table="captions.jsonl")
    with pytest.raises(UserError, match=r"hw-v2\.yaml: captions.table 'captions.jsonl' must start with one of"):
        plan_captions(root, ambiguous, snap)


@pytest.mark.parametrize(
    ("table", "content", "error"),
    [
        ("missing.csv", None, r"missing\.csv: caption table not found"),
        ("t.csv", "file,text\na.png,hdaesth\n", r"t\.csv: no column 'caption'"),
        ("t.csv", "file,caption\na.png,hdaesth, front view\n", r"t\.csv: row 1 has more fields than the header"),
        ("t.csv", "", r"t\.csv: caption table is empty"),
        ("t.csv", b"file,caption\na.png,caf\xe9\n", r"t\.csv: not UTF-8"),
        ("t.jsonl", '{"file": "a.png", "caption": "x"}\n{"file": \n', r"t\.jsonl: line 2 is not valid JSON"),
        ("t.jsonl", '["a.png", "x"]\n', r"t\.jsonl: line 1 is not a JSON object"),
        ("t.jsonl", '{"file": ' + "[" * 100_000 + "\n", r"t\.jsonl: line 1 is not JSON this reader accepts"),
        ("t.jsonl", '{"file": ' + "9" * 5000 + "}\n", r"t\.jsonl: line 1 is not JSON this reader accepts"),
        ("t.tsv", "file\tcaption\n", r"t\.tsv: a caption table must be \.csv or \.jsonl"),
        ("../t.csv", "file,caption\n", r"hw-v2\.yaml: captions.table '../t.csv' must be a path inside batch 'b1'"),
    ],
)
def test_unusable_tables_raise(root: DataRoot, table: str, content: str | bytes | None, error: str) -> None:
    batch_files(root, "b1", {"a.png": IMG})
    if content is not None:
        put(root.batch("b1") / table, content)
    snap = snapshot(root, "hw-v2", {"a.png": ("batch:b1", "a.png")})
    with pytest.raises(UserError, match=error):
        plan_captions(root, spec_for(source="table", table=table), snap)


def test_attributes_template(root: DataRoot) -> None:
    batch_files(
        root,
        "b1",
        {
            "a.png": IMG,
            "b.png": IMG,
            "attrs.csv": "file,view,color,finish,notes\na.png,front view,red,matte,x\nb.png,side view,,glossy,\n",
        },
    )
    snap = snapshot(root, "hw-v2", {"a.png": ("batch:b1", "a.png"), "b.png": ("batch:b1", "b.png")})
    template = "{trigger}, {view}, {color} body, {finish} finish"
    plan = plan_captions(root, spec_for(source="attributes", table="attrs.csv", template=template), snap)

    assert plan.captions == {f"{FOLDER}/a.png": "hdaesth, front view, red body, matte finish"}
    assert plan.caption_sources[f"{FOLDER}/a.png"] == "attributes:b1/attrs.csv#1"
    empty = by_code(plan, "empty_attribute")
    assert empty["b.png"]["severity"] == "error"
    assert "row 2 of attrs.csv has no value for color" in empty["b.png"]["message"]
    assert "missing_caption" not in {p["code"] for p in plan.problems}

    bad = spec_for(source="attributes", table="attrs.csv", template="{trigger}, {material}")
    with pytest.raises(UserError, match=r"attrs\.csv: no column 'material' \(needed by captions.template\)"):
        plan_captions(root, bad, snap)
    with pytest.raises(UserError, match=r"placeholder '\{view.upper\}' must name a table column"):
        plan_captions(root, spec_for(source="attributes", table="attrs.csv", template="{view.upper}"), snap)


def test_dataset_sources_take_the_earlier_versions_caption(root: DataRoot) -> None:
    put(root.dataset("hw-v1") / FOLDER / "old.txt", "hdaesth, three-quarter view\n")
    batch_files(root, "b1", {"new.png": IMG, "new.txt": "hdaesth, front view"})
    snap = snapshot(
        root,
        "hw-v2",
        {
            "old.png": ("dataset:hw-v1", f"{FOLDER}/old.png"),
            "lost.png": ("dataset:hw-v1", f"{FOLDER}/lost.png"),
            "new.png": ("batch:b1", "new.png"),
        },
    )
    spec = spec_for(SourceRef(dataset="hw-v1"), SourceRef(batch="b1"))
    plan = plan_captions(root, spec, snap)

    assert plan.captions[f"{FOLDER}/old.png"] == "hdaesth, three-quarter view"
    assert plan.caption_sources[f"{FOLDER}/old.png"] == f"dataset:hw-v1/{FOLDER}/old.txt"
    assert plan.captions[f"{FOLDER}/new.png"] == "hdaesth, front view"
    assert f"hw-v1/{FOLDER}/lost.txt not found" in by_code(plan, "missing_caption")[f"{FOLDER}/lost.png"]["message"]


def test_prepend_trigger_and_lint_through_plan(root: DataRoot) -> None:
    batch_files(
        root,
        "b1",
        {
            "a.png": IMG,
            "a.txt": "front view, hdaesth, red appliance",
            "b.png": IMG,
            "b.txt": "side view",
        },
    )
    snap = snapshot(root, "hw-v2", {"a.png": ("batch:b1", "a.png"), "b.png": ("batch:b1", "b.png")})
    plan = plan_captions(root, spec_for(prepend_trigger=True, banned=("appliance",)), snap)
    assert plan.captions == {
        f"{FOLDER}/a.png": "hdaesth, front view, red appliance",
        f"{FOLDER}/b.png": "hdaesth, side view",
    }
    banned = by_code(plan, "banned_word")[f"{FOLDER}/a.png"]
    assert banned["message"] == "the caption uses the banned word 'appliance' (caption from sidecar:b1/a.txt)"
    assert plan.tag_frequency == {"10_hdaesth": {"hdaesth": 2, "front view": 1, "red appliance": 1, "side view": 1}}

    strict = plan_captions(root, spec_for(), snap)
    assert set(by_code(strict, "trigger_not_first")) == {f"{FOLDER}/a.png", f"{FOLDER}/b.png"}


def test_images_sharing_a_stem_are_not_captioned(root: DataRoot) -> None:
    batch_files(root, "b1", {"a.png": IMG, "a.txt": "hdaesth, x"})
    batch_files(root, "b2", {"a.jpg": IMG, "a.txt": "hdaesth, y"})
    snap = snapshot(root, "hw-v2", {"a.png": ("batch:b1", "a.png"), "a.jpg": ("batch:b2", "a.jpg")})
    plan = plan_captions(root, spec_for(SourceRef(batch="b1"), SourceRef(batch="b2")), snap)
    assert plan.captions == {}
    assert set(by_code(plan, "caption_stem_collision")) == {f"{FOLDER}/a.png", f"{FOLDER}/a.jpg"}


def test_write_captions_is_atomic_readonly_and_idempotent(root: DataRoot) -> None:
    put(root.dataset("hw-v1") / FOLDER / "old.txt", "hdaesth, matte\n")
    batch_files(root, "b1", {"views/a.png": IMG, "views/a.txt": "hdaesth,  front view\n"})
    snap = snapshot(
        root, "hw-v2", {"a.png": ("batch:b1", "views/a.png"), "old.png": ("dataset:hw-v1", f"{FOLDER}/old.png")}
    )
    spec = spec_for(SourceRef(dataset="hw-v1"), SourceRef(batch="b1"))
    plan = plan_captions(root, spec, snap)
    image_rows = read_manifest(snap)
    rows = write_captions(snap, plan)

    written = snap / FOLDER / "a.txt"
    assert written.read_text(encoding="utf-8") == "hdaesth, front view\n"
    assert stat.S_IMODE(written.stat().st_mode) == 0o444
    assert [p.name for p in (snap / FOLDER).iterdir() if p.name.startswith(".")] == []  # no temp files left
    assert [row.to_json_dict() for row in rows] == [
        {
            "path": f"{FOLDER}/a.txt",
            "kind": "caption",
            "sha256": sha256_file(written),
            "bytes": written.stat().st_size,
            "image": f"{FOLDER}/a.png",
            "caption_source": "sidecar:b1/views/a.txt",
            "source_batch": "b1",
            "source_path": "views/a.txt",
            "source_sha256": sha256_file(root.batch("b1") / "views/a.txt"),
        },
        {
            "path": f"{FOLDER}/old.txt",
            "kind": "caption",
            "sha256": sha256_file(snap / FOLDER / "old.txt"),
            "bytes": len("hdaesth, matte\n"),
            "image": f"{FOLDER}/old.png",
            "caption_source": f"dataset:hw-v1/{FOLDER}/old.txt",
            "source_dataset": "hw-v1",
            "source_path": f"{FOLDER}/old.txt",
            "source_sha256": sha256_file(root.dataset("hw-v1") / FOLDER / "old.txt"),
        },
    ]
    assert write_manifest(snap, image_rows + rows) == manifest_root(image_rows + rows)

    before = written.stat().st_mtime_ns
    os.utime(written, ns=(before - 10**9, before - 10**9))
    assert write_captions(snap, plan_captions(root, spec, snap)) == rows
    assert written.stat().st_mtime_ns == before - 10**9  # untouched, not rewritten

    plan.captions[f"{FOLDER}/a.png"] = "hdaesth, side view"
    with pytest.raises(UserError, match=r"a\.txt: differs from the new caption; snapshots are immutable"):
        write_captions(snap, plan)
    assert written.read_text(encoding="utf-8") == "hdaesth, front view\n"


def test_caption_path_and_source_parsing() -> None:
    assert caption_path("img/10_x/a.b.png") == "img/10_x/a.b.txt"
    assert parse_caption_source("table:b1/meta/c#1.csv#12") == ("table", "b1", "meta/c#1.csv")
    assert parse_caption_source("dataset:v1/img/10_x/a.txt") == ("dataset", "v1", "img/10_x/a.txt")


def test_linked_sidecar_image_and_table_are_reported_and_none_of_their_bytes_reach_the_snapshot(
    root: DataRoot, tmp_path: Path, image_bytes
) -> None:
    from lora_pipeline.core.datasets.snapshot.snapshot import build_snapshot
    from lora_pipeline.core.datasets.sources.regular_files import NotRegularFile
    from lora_pipeline.core.fileio import read_json
    from lora_pipeline_tests.helpers import finish_version

    outside = tmp_path / "outside"
    secret_text = put(outside / "secret.txt", "hdaesth, front view, SECRET-FROM-OUTSIDE")
    secret_image = put(outside / "secret.png", image_bytes(9))
    secret_table = put(outside / "captions.csv", "file,caption\na.png,\"hdaesth, SECRET-FROM-OUTSIDE\"\n")
    batch_files(root, "b1", {"a.png": image_bytes(1), "c.png": image_bytes(3), "c.txt": "hdaesth, side view"})
    os.symlink(secret_text, root.batch("b1") / "a.txt")  # a linked sidecar
    os.symlink(secret_image, root.batch("b1") / "b.png")  # a linked image
    os.symlink(secret_table, root.batch("b1") / "captions.csv")  # a linked caption table

    spec = spec_for()
    build_snapshot(root, spec, "c")
    finish_version(root, spec)
    snap = root.dataset(spec.name)
    report = read_json(snap / "report.json")
    problems = {(p["code"], p["file"]): p for p in report["problems"]}
    assert problems[("symlink_not_followed", "a.txt")]["severity"] == "warning"
    assert problems[("symlink_not_followed", "b.png")]["severity"] == "warning"
    missing = problems[("missing_caption", f"{FOLDER}/a.png")]
    assert missing["severity"] == "error"
    assert "sidecar b1/a.txt is a symbolic link; it was not read" in missing["message"]
    assert not report["passed"]
    manifest = read_manifest(snap)
    assert sorted(r.path for r in manifest) == [f"{FOLDER}/a.png", f"{FOLDER}/c.png", f"{FOLDER}/c.txt"]
    assert sha256_file(secret_image) not in {r.sha256 for r in manifest}
    for path in snap.rglob("*"):
        if path.is_file():
            assert b"SECRET-FROM-OUTSIDE" not in path.read_bytes(), path
            assert path.read_bytes() != secret_image.read_bytes()

    table_spec = spec_for(name="hw-v3", source="table", table="b1/captions.csv")
    with pytest.raises(NotRegularFile) as err:
        build_snapshot(root, table_spec, "c")
    table = root.batch("b1") / "captions.csv"
    assert str(err.value) == f"{table}: symbolic link, not followed; nothing was read from it"
    assert not os.path.lexists(root.dataset("hw-v3"))  # refused before anything was copied


def test_a_huge_caption_is_a_problem_and_is_never_read_whole(root: DataRoot, image_bytes) -> None:
    import time

    from lora_pipeline.core.datasets.sources.regular_files import CAPTION_LIMIT

    batch_files(root, "b1", {"a.png": image_bytes(1), "b.png": image_bytes(2), "b.txt": "hdaesth, side view"})
    with open(root.batch("b1") / "a.txt", "wb") as f:
        f.write(b"hdaesth, " + b"front view, " * (120 * 1024 * 1024 // 12))  # a 120 MB "caption"
    snap = snapshot(root, "hw-v2", {"a.png": ("batch:b1", "a.png"), "b.png": ("batch:b1", "b.png")})
    started = time.monotonic()
    plan = plan_captions(root, spec_for(), snap)
    assert time.monotonic() - started < 5
    too_large = by_code(plan, "caption_too_large")["a.txt"]
    assert too_large["severity"] == "error" and f"larger than {CAPTION_LIMIT:,} bytes" in too_large["message"]
    assert list(plan.captions) == [f"{FOLDER}/b.png"]
    put(root.batch("b1") / "t.csv", f"file,caption\na.png,\"hdaesth, {'x' * CAPTION_LIMIT}\"\nb.png,hdaesth\n")
    plan = plan_captions(root, spec_for(source="table", table="t.csv"), snap)
    assert "caption_too_large" in {p["code"] for p in plan.problems} and list(plan.captions) == [f"{FOLDER}/b.png"]


def test_the_caption_check_is_the_plan_written_once_and_the_snapshots_caption_files(root: DataRoot) -> None:
    batch_files(root, "b1", {"a.png": IMG, "a.txt": "hdaesth, zebra, front view", "b.png": IMG,
                             "b.txt": "front view, hdaesth", "c.png": IMG})
    snap = snapshot(root, "hw-v2", {"a.png": ("batch:b1", "a.png"), "b.png": ("batch:b1", "b.png"),
                                    "c.png": ("batch:b1", "c.png")})
    plan = plan_captions(root, spec_for(vocabulary=["front view"]), snap)
    write_manifest(snap, read_manifest(snap) + write_captions(snap, plan))
    write_caption_check(snap, plan)
    # the sources change after the version was captioned: what is checked is the snapshot, not a new plan
    (root.batch("b1") / "a.txt").write_text("hdaesth, product shot")
    (root.batch("b1") / "c.txt").write_text("hdaesth, side view")

    check = load_caption_check(snap)

    assert check.captions == plan.captions == {f"{FOLDER}/a.png": "hdaesth, zebra, front view",
                                               f"{FOLDER}/b.png": "front view, hdaesth"}
    assert {p["code"] for p in check.problems} == {"missing_caption", "trigger_not_first", "out_of_vocabulary"}
    assert check.problems == plan.problems and check.tag_frequency == plan.tag_frequency
    assert check.lint == plan.lint and list(check.lint) == list(plan.lint)  # stats keep their order
    (snap / FOLDER / "b.txt").chmod(0o644)
    (snap / FOLDER / "b.txt").write_text("hdaesth, edited in the snapshot\n")
    assert load_caption_check(snap).captions[f"{FOLDER}/b.png"] == "hdaesth, edited in the snapshot"
