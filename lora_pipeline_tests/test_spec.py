"""Dataset specs: strict types, ranges, cross-field rules, one-line errors, and unchanged hashes."""

from __future__ import annotations

import pytest
import yaml

from lora_pipeline.core.datasets.spec import CaptionSpec, DatasetSpec, SourceRef, load_spec
from lora_pipeline.core.errors import UserError
from lora_pipeline_tests.helpers import committed_data

REPO_SPECS = committed_data() / "specs"
# spec_sha256 of the committed samples as the hand-written parser computed them: datasets built
# before the typed schema record these, and must not be refused as changed.
SAMPLE_SPEC_SHA256 = {
    "hardware-design-aesthetic-v1": "01c950cc6084583be0703c2663237428140762be249df2e21dffdb97151a4953",
    "hardware-design-aesthetic-v2": "0493027355374d5834c0f7547de5c7f11261a2d71b3f3db7380713babfa4acbf",
    "hardware-promoted-merge-v1": "7e6c2c8f641c7346fbc15863aaa1054a6417d0143317a5a73156f01cc5c0a6c4",
    "hardware-curated-v1": "6ec77cccbed2123586bfdc1ec20d244515ea86c51cbed59b24fc67bb066fc15b",  # auto_rebuild sample
}
BASE = {"name": "s-v1", "trigger": "hdaesth", "repeats": 2, "sources": [{"batch": "b1"}]}


def _spec(tmp_path, data: dict | None = None, **fields) -> DatasetSpec:
    merged = {**BASE, **(data or {})}
    for key, value in fields.items():
        section, _, field = key.partition("__")
        if field:
            merged[section] = {**merged.get(section, {}), field: value}
        else:
            merged[section] = value
    path = tmp_path / "s-v1.yaml"
    path.write_text(yaml.safe_dump(merged, sort_keys=False, allow_unicode=True))
    return load_spec(path)


def _refused(tmp_path, *needles: str, **fields) -> str:
    with pytest.raises(UserError) as caught:
        _spec(tmp_path, **fields)
    message = str(caught.value)
    assert "\n" not in message and ".yaml: " in message
    for needle in needles:
        assert needle in message, message
    return message


def test_committed_samples_hash_as_before():
    hashes = {p.stem: load_spec(p).sha256 for p in sorted(REPO_SPECS.glob("*.yaml"))}
    assert {k: v for k, v in hashes.items() if k in SAMPLE_SPEC_SHA256} == SAMPLE_SPEC_SHA256


def test_defaults_and_resolved_form(tmp_path):
    spec = _spec(tmp_path, intent=None, captions=None)  # a null field takes its default
    assert spec.intent == "" and spec.captions == CaptionSpec() and spec.checks.min_side == 512
    assert spec.resolved()["captions"]["from"] == "sidecar" and "source" not in spec.resolved()["captions"]
    assert spec.class_folder == "2_hdaesth"
    assert _spec(tmp_path, checks__max_aspect=3).checks.max_aspect == 3.0  # an integer is a number
    assert _spec(tmp_path, sources=[{"batch": "b1", "include": "*.png"}]).sources[0].include == ("*.png",)


@pytest.mark.parametrize(
    ("fields", "needles"),
    [
        ({"captions__shared_caption_limit": "lots"}, ["captions.shared_caption_limit", "whole number", "'lots'"]),
        ({"captions__shared_caption_limit": 0}, ["captions.shared_caption_limit", "at least 1"]),
        ({"captions__from": "table", "captions__table": ["a.csv", "b.csv"]}, ["captions.table", "expected text"]),
        ({"captions__from": "attributes", "captions__table": "a.csv", "captions__template": 5},
         ["captions.template", "expected text", "got 5"]),
        ({"captions__from": "table"}, ["captions", "'table' is required"]),
        ({"captions__from": "attributes", "captions__table": "a.csv"}, ["captions", "'template' is required"]),
        ({"captions__from": "tables"}, ["captions.from", "sidecar", "attributes"]),
        ({"captions__source": "table"}, ["captions.source", "unknown field"]),
        ({"merge": "false"}, ["merge", "true or false", "'false'"]),
        ({"captions__prepend_trigger": "no"}, ["captions.prepend_trigger", "true or false"]),
        ({"auto_rebuild": 1}, ["auto_rebuild", "true or false"]),
        ({"checks__min_side": True}, ["checks.min_side", "whole number", "True"]),
        ({"checks__max_aspect": "2.5"}, ["checks.max_aspect", "expected a number"]),
        ({"checks__max_aspect": float("nan")}, ["checks.max_aspect", "finite"]),
        ({"checks__near_duplicates": "loud"}, ["checks.near_duplicates", "'warn', 'error' or 'ignore'"]),
        ({"repeats": 0}, ["repeats", "at least 1"]),
        ({"repeats": 2.0}, ["repeats", "whole number"]),
        ({"trigger": "a/../../x"}, ["trigger", "not a name"]),
        ({"trigger": "two words"}, ["trigger", "not a name"]),
        ({"trigger": "hd,aesth"}, ["trigger", "not a name"]),
        ({"sources": []}, ["sources", "empty"]),
        ({"sources": [{"batch": "../x"}]}, ["sources[0].batch", "batch name"]),
        ({"sources": [{"batch": "b1\n"}]}, ["sources[0].batch"]),
        ({"sources": [{"batch": "b1"}, {"dataset": ".hidden"}]}, ["sources[1].dataset", "not a name"]),
        ({"sources": [{"batch": "b1", "dataset": "d-v1"}]}, ["sources[0]", "exactly one"]),
        ({"sources": ["b1"]}, ["sources[0]", "mapping"]),
        ({"captions": ["sidecar"]}, ["captions", "mapping"]),
        ({"colour": "red"}, ["colour", "unknown field"]),
        ({"name": "other-v1"}, ["name", "file stem"]),
    ],
)
def test_wrong_values_are_one_line_naming_the_field(tmp_path, fields, needles):
    _refused(tmp_path, *needles, **fields)


def test_missing_required_fields_are_named(tmp_path):
    path = tmp_path / "s-v1.yaml"
    path.write_text("name: s-v1\n")
    with pytest.raises(UserError, match="trigger: required field is missing; repeats: required field is missing"):
        load_spec(path)


def test_an_invalid_name_never_becomes_a_path(tmp_path):
    with pytest.raises(UserError, match="not a name"):
        _spec(tmp_path, name="a b")


def test_python_construction_validates_too():
    with pytest.raises(ValueError, match="exactly one"):
        SourceRef()
    with pytest.raises(ValueError):
        DatasetSpec(name="s-v1", trigger="../x", repeats=1, sources=(SourceRef(batch="b1"),))
    assert CaptionSpec(source="table", table="b1/t.csv").source == "table"
