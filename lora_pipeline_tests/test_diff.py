"""`lora-pipeline diff`: versions built and captioned by the real steps, with planted changes between them."""

from __future__ import annotations

import json

import pytest

from lora_pipeline.core.datasets.snapshot.snapshot import build_snapshot
from lora_pipeline.core.datasets.spec import ChecksSpec, DatasetSpec, SourceRef
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_bytes
from lora_pipeline.core.lineage.diff import diff_versions, word_diff
from lora_pipeline.core.lineage.diff_text import diff_markdown, parent_changes_markdown
from lora_pipeline.core.paths import DataRoot
from lora_pipeline_tests.helpers import assert_one_line_error, cli, finish_version

CAPTION = "hdaesth, front view, teal body, matte finish"


def _spec(name: str, *sources: SourceRef, repeats: int = 2, **fields: object) -> DatasetSpec:
    return DatasetSpec(name=name, trigger="hdaesth", repeats=repeats, sources=sources, **fields)


def _build(root: DataRoot, spec: DatasetSpec) -> None:
    build_snapshot(root, spec, "test")
    finish_version(root, spec)


@pytest.fixture
def versions(tmp_path, make_batch, image_bytes):
    """hw-v1 from batch b1 (a, b, c, d); hw-v2 from the corrected handoff b1-fix: a and b the same bytes, a's caption
    edited, c with new pixels, d left out, e new; min_side lowered. hw-v3: hw-v2 at another `repeats`."""
    root = DataRoot(tmp_path / "data")
    old = {n: image_bytes(i) for i, n in enumerate("abcd", 1)}
    make_batch(root, "b1", {**{f"{n}.png": d for n, d in old.items()}, **{f"{n}.txt": CAPTION for n in "abcd"}})
    new = {"a": old["a"], "b": old["b"], "c": image_bytes(30), "e": image_bytes(40)}
    captions = {n: CAPTION for n in new} | {"a": "hdaesth, side view, sage body, matte finish"}
    make_batch(
        root, "b1-fix", {**{f"{n}.png": d for n, d in new.items()}, **{f"{n}.txt": c for n, c in captions.items()}}
    )
    _build(root, _spec("hw-v1", SourceRef(batch="b1"), intent="first handoff"))
    _build(root, _spec("hw-v2", SourceRef(batch="b1-fix"), intent="corrected handoff", checks=ChecksSpec(min_side=16)))
    _build(
        root,
        _spec(
            "hw-v3", SourceRef(batch="b1-fix"), repeats=5, intent="corrected handoff", checks=ChecksSpec(min_side=16)
        ),
    )
    return root, old, new


def test_diff_lists_exactly_the_planted_additions_removals_replacements_and_caption_edits(versions):
    root, old, new = versions
    diff = diff_versions(root, "hw-v1", "hw-v2")
    folder = "img/2_hdaesth"
    assert [(e.path, e.batch, e.source_path, e.sha256) for e in diff.added] == [
        (f"{folder}/e.png", "b1-fix", "e.png", sha256_bytes(new["e"]))
    ]
    assert [(e.path, e.batch, e.sha256) for e in diff.removed] == [(f"{folder}/d.png", "b1", sha256_bytes(old["d"]))]
    assert [(p.old_path, p.path, p.old_sha256, p.sha256) for p in diff.replaced] == [
        (f"{folder}/c.png", f"{folder}/c.png", sha256_bytes(old["c"]), sha256_bytes(new["c"]))
    ]
    assert diff.moved == [] and diff.unchanged == 2  # a and b: the same bytes from the corrected batch
    assert diff.captions_compared
    assert [(c.image, c.word_diff, c.removed_words, c.added_words) for c in diff.captions_changed] == [
        (
            f"{folder}/a.png",
            "hdaesth, [-front-] {+side+} view, [-teal-] {+sage+} body, matte finish",
            ["front", "teal"],
            ["side", "sage"],
        )
    ]
    assert [(b.batch, b.old, b.new, b.added, b.removed, b.replaced) for b in diff.batches] == [
        ("b1", 4, 0, 0, 1, 0),
        ("b1-fix", 0, 4, 1, 0, 1),
    ]
    changes = {c.field: (c.old, c.new) for c in diff.spec_changes}
    assert set(changes) == {"intent", "sources", "checks.min_side"}
    assert changes["checks.min_side"] == (512, 16) and changes["intent"] == ("first handoff", "corrected handoff")
    assert not diff.identical

    text = diff_markdown(diff)
    assert "1 added, 1 removed, 1 replaced, 0 moved, 2 unchanged; 1 captions changed; 3 spec fields changed" in text
    for needle in (
        f"`{folder}/e.png` from `b1-fix/e.png`",
        f"`{folder}/d.png` (was from `b1/d.png`)",
        "`hdaesth, [-front-] {+side+} view, [-teal-] {+sage+} body, matte finish`",
        "| `checks.min_side` | `512` | `16` |",
        "| `b1` | 4 | 0 | 0 | 1 | 0 |",
    ):
        assert needle in text, text


def test_a_new_repeats_moves_every_image_and_a_version_equals_itself(versions):
    root, _, _ = versions
    moved = diff_versions(root, "hw-v2", "hw-v3")
    assert [(p.old_path, p.path) for p in moved.moved] == [
        (f"img/2_hdaesth/{n}.png", f"img/5_hdaesth/{n}.png") for n in "abce"
    ]
    assert not (moved.added or moved.removed or moved.replaced or moved.captions_changed)
    assert [(c.field, c.old, c.new) for c in moved.spec_changes] == [("repeats", 2, 5)]
    same = diff_versions(root, "hw-v2", "hw-v2")
    assert same.identical and same.unchanged == 4


def test_only_the_first_entries_of_a_long_list_reach_the_snapshot_page(versions):
    root, _, _ = versions
    text = diff_markdown(diff_versions(root, "hw-v2", "hw-v3"), limit=1)
    assert "`img/2_hdaesth/a.png` → `img/5_hdaesth/a.png`" in text and "b.png" not in text
    assert "- … and 3 more (`lora-pipeline diff hw-v2 hw-v3` lists all)" in text
    assert "no parent version" in parent_changes_markdown(root, "hw-v1")  # built from a batch alone


def test_word_diff_marks_insertions_and_deletions():
    assert word_diff("a, b, c", "a, c, d") == ("a, [-b,-] c {+, d+}", ["b"], ["d"])  # commas never anchor a match
    assert word_diff("", "x y") == ("{+x y+}", [], ["x", "y"])


def test_a_version_that_is_not_built_is_one_line(versions):
    root, _, _ = versions
    with pytest.raises(UserError, match="dataset version 'hw-v9' is not built"):
        diff_versions(root, "hw-v1", "hw-v9")


def test_the_command_prints_the_diff_and_json(versions, monkeypatch):
    root, _, _ = versions
    monkeypatch.setenv("LORA_PIPELINE_DATA", str(root.root))
    data = json.loads(cli("diff", "hw-v1", "hw-v2", "--json").stdout)
    assert [e["path"] for e in data["added"]] == ["img/2_hdaesth/e.png"]
    assert [c["image"] for c in data["captions_changed"]] == ["img/2_hdaesth/a.png"] and not data["identical"]
    assert "Changes from `hw-v1` to `hw-v2`: 1 added" in cli("diff", "hw-v1", "hw-v2").stdout
    assert_one_line_error(cli("diff", "hw-v1", "nope-v1", check=False), "dataset version 'nope-v1' is not built")
