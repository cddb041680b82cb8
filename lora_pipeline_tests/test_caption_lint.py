"""Caption text rules: normalisation, tags, trigger placement and the lint over a caption set."""

from __future__ import annotations

import pytest

from lora_pipeline.core.datasets.captions.caption_lint import lint_captions, phrase_pattern
from lora_pipeline.core.datasets.captions.tags import join_tags, normalise_caption, place_trigger, split_tags
from lora_pipeline.core.datasets.spec import CaptionSpec, DatasetSpec, SourceRef


def make_spec(flip_aug: bool = False, **captions: object) -> DatasetSpec:
    return DatasetSpec(
        name="hw-v2",
        trigger="hdaesth",
        repeats=10,
        sources=(SourceRef(batch="b1"),),
        flip_aug=flip_aug,
        captions=CaptionSpec(**captions),
    )


def codes(problems: list[dict], code: str) -> dict[str, str]:
    return {p["file"]: p["message"] for p in problems if p["code"] == code}


@pytest.mark.parametrize(
    ("raw", "expected", "multiline"),
    [
        ("  hdaesth ,front   view,,  matte  ", "hdaesth, front view, matte", False),
        ("hdaesth,\tside\u00a0view\n", "hdaesth, side view", False),
        ("hdaesth, front view\r\nmatte finish\r\n", "hdaesth, front view, matte finish", True),
        ("hdaesth\r\rglossy\n\n", "hdaesth, glossy", True),
        ("hdaesth,\nglossy,", "hdaesth, glossy", True),
        ("", "", False),
        (" , ,\n", "", False),
    ],
)
def test_normalise_caption(raw: str, expected: str, multiline: bool) -> None:
    assert normalise_caption(raw) == (expected, multiline)


def test_other_separator() -> None:
    assert split_tags("a | b  c ||", "|") == ["a", "b c"]
    assert normalise_caption("a|b\nc", "|") == ("a| b| c", True)
    assert join_tags(["a", "b"], " ") == "a b"


def test_place_trigger_prepends_once() -> None:
    assert place_trigger("front view, HDAESTH, matte, hdaesth", "hdaesth") == "hdaesth, front view, matte"
    assert place_trigger("hdaesth, matte", "hdaesth") == "hdaesth, matte"
    assert place_trigger("", "hdaesth") == "hdaesth"


def test_phrase_pattern_is_whole_word_and_case_insensitive() -> None:
    assert phrase_pattern("product").search("a Product shot")
    assert not phrase_pattern("product").search("production render")
    assert not phrase_pattern("product").search("byproduct")
    assert phrase_pattern("coffee machine").search("a coffee  Machine, matte")
    assert not phrase_pattern("coffee machine").search("coffee machinery")


def test_trigger_first_and_empty() -> None:
    problems, lint, _ = lint_captions(
        {
            "img/10_hdaesth/ok.png": "hdaesth, front view",
            "img/10_hdaesth/case.png": "HDAESTH, side view",
            "img/10_hdaesth/late.png": "front view, hdaesth",
            "img/10_hdaesth/none.png": "front view",
            "img/10_hdaesth/only.png": "hdaesth",
            "img/10_hdaesth/blank.png": "",
        },
        make_spec(),
    )
    not_first = codes(problems, "trigger_not_first")
    assert set(not_first) == {"img/10_hdaesth/late.png", "img/10_hdaesth/none.png"}
    assert "'front view'" in not_first["img/10_hdaesth/none.png"]
    assert set(codes(problems, "empty_caption")) == {"img/10_hdaesth/only.png", "img/10_hdaesth/blank.png"}
    assert all(p["severity"] == "error" and p["scope"] == "dataset:hw-v2" for p in problems)
    assert lint["empty"] == 2
    assert lint["tags_per_caption"] == {"min": 0, "max": 2, "mean": 1.33}


def test_banned_words_whole_word_only() -> None:
    spec = make_spec(banned=("product", "coffee machine"))
    problems, lint, _ = lint_captions(
        {
            "a.png": "hdaesth, production render, matte",
            "b.png": "hdaesth, product on table",
            "c.png": "hdaesth, Coffee Machine, product",
        },
        spec,
    )
    banned = [(p["file"], p["message"]) for p in problems if p["code"] == "banned_word"]
    assert banned == [
        ("b.png", "the caption uses the banned word 'product'"),
        ("c.png", "the caption uses the banned word 'product'"),
        ("c.png", "the caption uses the banned word 'coffee machine'"),
    ]
    assert lint["banned_hits"] == {"product": 2, "coffee machine": 1}


def test_vocabulary_one_warning_per_caption_with_counts() -> None:
    spec = make_spec(vocabulary=("front view", "three-quarter view", "matte", "glossy", "body"))
    problems, lint, _ = lint_captions(
        {
            "a.png": "hdaesth, front view, matte red body",
            "b.png": "hdaesth, three-quarter view, glossy red body, red, 2 buttons",
            "c.png": "hdaesth, front view, glossy",
        },
        spec,
    )
    oov = codes(problems, "out_of_vocabulary")
    assert set(oov) == {"a.png", "b.png"}
    assert oov["b.png"].endswith(": red, buttons")
    assert all(p["severity"] == "warning" for p in problems if p["code"] == "out_of_vocabulary")
    assert lint["oov_terms"] == {"red": 2, "buttons": 1}


def test_no_vocabulary_means_no_oov() -> None:
    problems, lint, _ = lint_captions({"a.png": "hdaesth, anything goes"}, make_spec())
    assert problems == []
    assert lint["oov_terms"] == {}


def test_shared_captions_over_limit() -> None:
    captions = {f"s{i}.png": "hdaesth, front view" for i in range(3)}
    captions |= {f"t{i}.png": "hdaesth, side view" for i in range(2)}
    problems, lint, _ = lint_captions(captions, make_spec(shared_caption_limit=2))
    shared = codes(problems, "shared_caption")
    assert set(shared) == {"s0.png", "s1.png", "s2.png"}
    assert "used by 3 images (limit 2)" in shared["s0.png"]
    assert lint["shared_captions"] == [
        {"caption": "hdaesth, front view", "count": 3, "files": ["s0.png", "s1.png", "s2.png"]}
    ]


def test_tag_frequency_in_kohya_shape() -> None:
    _, _, frequency = lint_captions(
        {"a.png": "hdaesth, Front View, matte", "b.png": "hdaesth, front view", "c.png": "hdaesth, matte, matte"},
        make_spec(),
    )
    assert frequency == {"10_hdaesth": {"hdaesth": 3, "matte": 3, "front view": 2}}


def test_flip_aug_in_the_spec_warns_about_captions_that_mention_writing() -> None:
    captions = {"a.png": "hdaesth, black logo on the lid", "b.png": "hdaesth, matte finish",
                "c.png": "hdaesth, printed LETTERING, side view"}
    problems, lint, _ = lint_captions(captions, make_spec(flip_aug=True))
    warned = codes(problems, "flip_mirrors_text")
    assert sorted(warned) == ["a.png", "c.png"] and "'logo'" in warned["a.png"] and "'LETTERING'" in warned["c.png"]
    assert all(p["severity"] == "warning" for p in problems if p["code"] == "flip_mirrors_text")
    assert lint["flip_mirrors_text"] == 2
    # without flip_aug the same captions are fine, and the lint stats (captions.json) are as before the field
    problems, lint, _ = lint_captions(captions, make_spec())
    assert not codes(problems, "flip_mirrors_text") and "flip_mirrors_text" not in lint
    # a spec without flip_aug keeps the hash it had before the field existed; setting it changes the hash
    assert "flip_aug" not in make_spec().resolved() and make_spec(flip_aug=True).resolved()["flip_aug"] is True
    assert make_spec().sha256 != make_spec(flip_aug=True).sha256
