"""docs/fields.md is what the schema classes render: the reference cannot drift from the loader."""

from __future__ import annotations

from dataclasses import fields

from lora_pipeline.core.datasets.spec import CaptionSpec, ChecksSpec, DatasetSpec, SourceRef
from lora_pipeline.core.training.recipe import Recipe
from scripts.fielddocs import FIELDS_DOC, render_field_reference


def test_committed_reference_equals_the_generated_one():
    assert FIELDS_DOC.read_text(encoding="utf-8") == render_field_reference(), "run `make docs` and commit"


def test_every_field_is_documented_with_its_limits():
    text = render_field_reference()
    for kind in (DatasetSpec, SourceRef, CaptionSpec, ChecksSpec, Recipe):
        for f in fields(kind):
            yaml_name = "from" if f.name == "source" else f.name
            assert f"| `{yaml_name}` |" in text, yaml_name
    assert "| `bucket_reso_steps` | integer | `64` | >= 8, <= 1024, multiple of 8 |" in text
    assert "| `base_model` | text | **required** |" in text
