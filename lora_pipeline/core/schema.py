"""Typed config files and records: the strict field types specs and recipes are made of, one-line errors, and
`Record`, the base of the JSON files and rows the pipeline writes for other modules to read.

Specs and recipes are pydantic dataclasses (so `dataclasses.asdict`/`replace` keep working and the
hashes of existing files do not change). Types are strict: `"false"` is not a bool, `true` is not
an integer, `"2.5"` is not a number; an integer is accepted where a number is expected. NaN and
infinity are refused. A field written as `null` (or left empty) takes its default.

A pydantic `ValidationError` becomes one `UserError` line naming the file, the field path
(`captions.template`, `sources[0].batch`) and what was expected.

The hashes of specs and recipes read a per-field mark (`ADDED_LATER`, `NOT_HASHED`, in the field's
`json_schema_extra`): a field added after files of its kind were first hashed counts only when it is not its
default, so older files, and what was built or trained from them, keep their hash; a field that says when, not
what (a recipe's `train_on`), never counts.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Self, TypeVar

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Strict,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)
from pydantic.fields import FieldInfo

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import read_json
from lora_pipeline.core.names import check_name

T = TypeVar("T")

CONFIG = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True)

Bool = Annotated[bool, Strict()]
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), AllowInfNan(False)]
Text = Annotated[str, Strict()]
Name = Annotated[str, Strict(), AfterValidator(check_name), WithJsonSchema({"type": "string", "format": "name"})]


def _one_or_many(value: Any) -> Any:
    """A single string where a list of strings is expected means a list of one."""
    return [value] if isinstance(value, str) else value


TextList = Annotated[tuple[Text, ...], BeforeValidator(_one_or_many)]


def non_empty(items: tuple[Any, ...]) -> tuple[Any, ...]:
    """For list fields that need an item (a `min_length` would also fire when every item is invalid)."""
    if not items:
        raise ValueError("must not be an empty list")
    return items


HASH_RULE_KEY = "hash"  # the key of a field's json_schema_extra that says how its hash counts it
# json_schema_extra of a field added after files of its kind were first hashed: counted only when not its default
ADDED_LATER: dict[str, Any] = {HASH_RULE_KEY: "when_not_default"}
NOT_HASHED: dict[str, Any] = {HASH_RULE_KEY: "never"}  # json_schema_extra of a field the hash never counts


def _hash_rule(info: FieldInfo) -> str | None:
    extra = info.json_schema_extra
    return extra.get(HASH_RULE_KEY) if isinstance(extra, dict) else None


def later_fields(kind: type) -> dict[str, Any]:
    """{field: default} of a schema class's fields that count in its hash only when not their default."""
    return {name: info.default for name, info in kind.__pydantic_fields__.items()
            if _hash_rule(info) == "when_not_default"}


def hashed_values(kind: type, values: dict[str, Any]) -> dict[str, Any]:
    """`values` (a `kind` as plain data, keyed by field name) without what its hash leaves out: fields marked
    `never`, and fields marked `when_not_default` that hold their default."""
    infos = kind.__pydantic_fields__
    left_out = {name for name, info in infos.items() if _hash_rule(info) == "never"}
    left_out |= {name for name, default in later_fields(kind).items() if values.get(name, ...) == default}
    return {name: value for name, value in values.items() if name not in left_out}


_MAX_ERRORS_SHOWN = 3
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,40}")


def _without_nulls(value: Any) -> Any:
    """Drop `key: null` entries from every mapping, so that a null field takes its default."""
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if _PLAIN_KEY.fullmatch(part) else repr(part[:40])
            out += f".{key}" if out else key
    return out


def _shown(value: Any) -> str:
    """The offending input in a few characters, always on one line."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        text = repr(value[:40] + ("..." if len(value) > 40 else ""))
        return f"{text}, text"
    if isinstance(value, bool) or value is None or isinstance(value, int | float):
        try:
            text = repr(value)
        except ValueError:  # an integer too long to print
            return "a very long number"
        return text if len(text) <= 40 else text[:37] + "..."
    return type(value).__name__


def _expected(error: Mapping[str, Any]) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    plain = {
        "missing": "required field is missing",
        "missing_argument": "required field is missing",
        "extra_forbidden": "unknown field",
        "unexpected_keyword_argument": "unknown field",
        "bool_type": "expected true or false",
        "int_type": "expected a whole number",
        "float_type": "expected a number",
        "finite_number": "expected a finite number (not NaN or infinity)",
        "string_type": "expected text",
        "tuple_type": "expected a list",
        "list_type": "expected a list",
        "dataclass_type": "expected a mapping of fields",
        "dict_type": "expected a mapping of fields",
        "model_type": "expected a mapping of fields",
    }
    if kind in plain:
        return plain[kind]
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected')}"
    bounds = {
        "greater_than": ("greater than", "gt"),
        "greater_than_equal": ("at least", "ge"),
        "less_than": ("less than", "lt"),
        "less_than_equal": ("at most", "le"),
        "multiple_of": ("a multiple of", "multiple_of"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx.get(key)}"
    if kind in ("too_short", "string_too_short"):
        return "must not be empty" if ctx.get("min_length") == 1 else f"needs at least {ctx.get('min_length')} items"
    if kind in ("too_long", "string_too_long"):
        return f"must have at most {ctx.get('max_length')} {'characters' if kind.startswith('string') else 'items'}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    return str(error["msg"])


def describe(exc: ValidationError, path: Path) -> UserError:
    """One line for all of a validation's errors (the first few, then a count)."""
    return UserError(error_line(exc), path)


def error_line(exc: ValidationError) -> str:
    """A validation's errors in one line: the first few, then a count."""
    parts = []
    errors = exc.errors(include_url=False)
    for error in errors[:_MAX_ERRORS_SHOWN]:
        where = _field_path(tuple(error["loc"]))
        got = "" if error["type"] in ("missing", "missing_argument") else f" (got {_shown(error['input'])})"
        if error["type"] in ("extra_forbidden", "unexpected_keyword_argument", "value_error", "assertion_error"):
            got = ""
        parts.append(f"{where + ': ' if where else ''}{_expected(error)}{got}")
    more = len(errors) - _MAX_ERRORS_SHOWN
    line = "; ".join(parts) + (f"; and {more} more problem{'s' if more > 1 else ''}" if more > 0 else "")
    return " ".join(line.split())


@functools.cache
def _adapter(kind: type[T]) -> TypeAdapter[T]:
    return TypeAdapter(kind)


def validate(kind: type[T], data: Mapping[str, Any], path: Path) -> T:
    """`data` (plain YAML data) as a `kind`, or a one-line UserError naming `path`.

    Fields are read by their YAML names only (`from`, not the attribute name `source`).
    """
    try:
        return _adapter(kind).validate_python(_without_nulls(data), by_alias=True, by_name=False)
    except ValidationError as exc:
        raise describe(exc, path) from None


class Record(BaseModel):
    """A record the pipeline writes as JSON for other modules to read: a manifest row, snapshot.json, report.json,
    the provenance chain. Strict like the config files (an integer stays an integer, unknown fields are refused)
    and frozen.

    A field is written back only when it was given, read from the file or passed when built, just as a dict holds
    only its keys: a row built without `mask` gets no `"mask": null`, a row read with `"width": null` keeps it. A
    file read and written again is therefore the same bytes, and every hash over it the same.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_by_name=True,
                              validate_by_alias=True)

    def to_json_dict(self) -> dict[str, Any]:
        """The record as the JSON data it is written as: given fields only, under their JSON names."""
        return self.model_dump(by_alias=True, exclude_unset=True)

    @classmethod
    def read(cls, path: Path) -> Self:
        """The record in the JSON file `path`; a one-line UserError naming the file when it is not one."""
        try:
            return cls.model_validate(read_json(path))
        except ValidationError as exc:
            raise describe(exc, path) from None
