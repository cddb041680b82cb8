"""The field reference of specs and recipes (docs/fields.md), generated from their schema classes.

`make docs` rewrites the file; a test asserts the committed file equals what this module renders, so
the reference cannot drift from what the loader accepts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from lora_pipeline.core.datasets.spec import CaptionSpec, ChecksSpec, DatasetSpec, SourceRef
from lora_pipeline.core.names import NAME_RULE
from lora_pipeline.core.paths import REPO_ROOT
from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline.core.yamlfile import MAX_DEPTH, MAX_YAML_BYTES

FIELDS_DOC = REPO_ROOT / "docs" / "fields.md"

INTRO = f"""# Spec and recipe fields

Generated from the schema classes in `lora_pipeline/core/datasets/spec.py`,
`lora_pipeline/core/training/recipe_fields.py` and `lora_pipeline/core/training/adapter_fields.py` by
`make docs`; a test keeps this file equal to them.

Rules for every spec and recipe file:

- Types are strict: `true`/`false` only for booleans (`"false"` or `no` in quotes is text, not false), whole
  numbers for integers (`true` is not 1, `2.0` is not 2), numbers for numbers (an integer is fine; NaN and
  infinity are not). Unknown fields are refused. A field written as `null`, or left empty, takes its default.
- A **name** is {NAME_RULE}. Names become folder names and Dagster partition keys.
- The file is at most {MAX_YAML_BYTES:,} bytes of UTF-8 YAML, nested at most {MAX_DEPTH} levels, without
  aliases (`*name`), merge keys (`<<`), duplicate keys or tags other than plain data; dates stay text.
- A mistake is reported as one line naming the file, the field (`captions.template`, `sources[0].batch`) and
  what was expected.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _type(prop: dict[str, Any]) -> str:
    if "anyOf" in prop:
        kinds = [_type(p) for p in prop["anyOf"] if p.get("type") != "null"]
        nullable = any(p.get("type") == "null" for p in prop["anyOf"])
        return " or ".join(kinds) + (" or null" if nullable else "")
    if "$ref" in prop:
        return "mapping (below)"
    if "enum" in prop:
        return " | ".join(f"`{v}`" for v in prop["enum"])
    if prop.get("type") == "array":
        items = prop.get("items", {})
        return "list of " + ("mappings (below)" if "$ref" in items else _type(items))
    if prop.get("type") == "object":  # a mapping of text keys (a recipe's optimizer_args)
        return f"mapping of text to ({_type(prop.get('additionalProperties', {}))})"
    if "format" in prop:
        return str(prop["format"])
    return {"string": "text", "integer": "integer", "number": "number", "boolean": "boolean"}[prop["type"]]


def _limits(prop: dict[str, Any]) -> str:
    if "anyOf" in prop:
        return "; ".join(filter(None, (_limits(p) for p in prop["anyOf"])))
    words = {
        "minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<",
        "multipleOf": "multiple of", "minLength": "length >=", "maxLength": "length <=",
        "minItems": "items >=", "maxItems": "items <=",
    }
    found = [f"{word} {prop[key]}" for key, word in words.items() if key in prop]
    if prop.get("type") == "array":
        found += [f"each {limit}" for limit in [_limits(prop.get("items", {}))] if limit]
    return ", ".join(found)


def _default(prop: dict[str, Any], required: bool) -> str:
    if "default_text" in prop:  # filled in by the loader (the recipe name is the file stem)
        return str(prop["default_text"])
    if required:
        return "**required**"
    if "$ref" in prop:
        return "(below)"
    value = prop.get("default")
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _table(kind: type, heading: str) -> list[str]:
    schema = TypeAdapter(kind).json_schema(by_alias=True)
    required = set(schema.get("required", []))
    lines = [f"### {heading}", ""]
    if kind.__doc__:
        lines += [" ".join(kind.__doc__.split()), ""]
    lines += ["| field | type | default | limits | meaning |", "|---|---|---|---|---|"]
    for name, prop in schema["properties"].items():
        cells = [f"`{name}`", _type(prop), _default(prop, name in required), _limits(prop), prop.get("description", "")]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return [*lines, ""]


def render_field_reference() -> str:
    lines = [INTRO, "## Spec fields (`data/specs/<version>.yaml`)", ""]
    lines += _table(DatasetSpec, "top level")
    lines += _table(SourceRef, "`sources[]` (each entry)")
    lines += _table(CaptionSpec, "`captions`")
    lines += _table(ChecksSpec, "`checks`")
    lines += ["## Recipe fields (`data/recipes/<recipe>.yaml`)", ""]
    lines += _table(Recipe, "top level")
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    target = Path(argv[0]) if argv else FIELDS_DOC
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_field_reference(), encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
