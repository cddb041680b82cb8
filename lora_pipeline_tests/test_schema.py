"""The typed config loader: one-line errors, and a Hypothesis fuzz test of specs and recipes.

The fuzz test writes generated files (valid samples mutated with wrong types, huge and negative
numbers, NaN, odd and unicode strings, nesting, unknown keys; and raw text) and asserts that loading
either returns a valid object or raises the one-line UserError naming the file: never another
exception, never more than PER_EXAMPLE_SECONDS. `make test` runs a few hundred examples; `make fuzz`
runs for FUZZ_SECONDS in all (a share for each of the FUZZ_TESTS fuzz tests, here and in test_fuzz_inputs.py).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Field, TypeAdapter
from pydantic.dataclasses import dataclass

from lora_pipeline.core.datasets.spec import DatasetSpec, load_spec
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.schema import ADDED_LATER, NOT_HASHED, describe, hashed_values, later_fields, validate
from lora_pipeline.core.training.recipe import Recipe, load_recipe
from lora_pipeline_tests.helpers import committed_data

REPO_DATA = committed_data()
SPEC_TEXT = (REPO_DATA / "specs" / "hardware-design-aesthetic-v2.yaml").read_text()
RECIPE_TEXT = (REPO_DATA / "recipes" / "style-sdxl.yaml").read_text()
SPEC_NAME, RECIPE_NAME = "hardware-design-aesthetic-v2", "style-sdxl"
FUZZ_TESTS = 5  # three here, two in test_fuzz_inputs.py (masks, the exec wrapper's arguments)
FUZZ_SECONDS_EACH = float(os.environ.get("FUZZ_SECONDS", "0")) / FUZZ_TESTS
EXAMPLES_PER_RUN = 120  # per fuzz test in `make test` (three tests); `make fuzz` repeats runs until time is up
PER_EXAMPLE_SECONDS = 3.0

SPEC_PATHS: list[tuple[Any, ...]] = [
    (k,) for k in ("name", "intent", "trigger", "repeats", "sources", "merge", "auto_rebuild", "captions", "checks")
] + [("sources", 0, k) for k in ("batch", "dataset", "include", "exclude")] + [
    ("captions", k) for k in ("from", "table", "template", "vocabulary", "banned", "prepend_trigger",
                              "shared_caption_limit")
] + [("checks", k) for k in ("min_side", "max_aspect", "near_duplicates", "max_pixels")]
RECIPE_PATHS: list[tuple[Any, ...]] = [(name,) for name in Recipe.__pydantic_fields__]

ODD_TEXT = ["", "false", "no", "yes", "on", "null", "~", "1e3", "0x1F", "../x", "a/b", ".hidden", "b1\n", "x\r",
            "\x00", "é", "💥", "*", "curated-*", "[", "sidecar", "table", "attributes", "warn", "DAdaptAdamW", "bf16",
            "{trigger}, {view}", "{0}", "{", "a" * 5000, "\u2028", "hdaesth", "tiny-sd", "- a", "a: b", "&a", "*a"]
ODD_NUMBERS = [0, -1, 1, 7, 8, 64, 2048, 2049, 2**31, 2**63, -(2**63), 10**30, 10**4000, 0.5, -0.0, 1e308, 5e-324]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(ODD_NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.sampled_from(ODD_TEXT),
)
keys = st.one_of(st.sampled_from([p[-1] for p in SPEC_PATHS + RECIPE_PATHS if isinstance(p[-1], str)]),
                 st.text(max_size=12))
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(keys, inner, max_size=5), max_leaves=25
)


def _set(data: Any, path: tuple[Any, ...], value: Any, delete: bool) -> None:
    """Set (or delete) `path` in nested data where it exists; making room for it where it does not."""
    for part in path[:-1]:
        if isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        elif isinstance(data, dict) and isinstance(part, str):
            data = data.setdefault(part, {}) if not isinstance(data.get(part), dict | list) else data[part]
        else:
            return
    last = path[-1]
    if isinstance(data, dict) and isinstance(last, str):
        if delete:
            data.pop(last, None)
        else:
            data[last] = value
    elif isinstance(data, list) and isinstance(last, int) and last < len(data):
        data[last] = value


@st.composite
def mutated(draw: st.DrawFn, text: str, paths: list[tuple[Any, ...]]) -> str:
    """A valid sample file with a few fields replaced, removed or added, dumped back to YAML."""
    data = copy.deepcopy(yaml.safe_load(text))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.one_of(st.sampled_from(paths), st.tuples(keys), st.tuples(st.sampled_from(paths), keys)))
        if isinstance(path[0], tuple):  # a new key under a known field
            path = (*path[0], path[1])
        _set(data, path, draw(values), delete=draw(st.integers(0, 5)) == 0)
    return yaml.safe_dump(data, sort_keys=draw(st.booleans()), allow_unicode=draw(st.booleans()))


@st.composite
def spliced(draw: st.DrawFn, text: str) -> str:
    """The sample's text with random characters put in at random places (broken YAML, odd bytes)."""
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 20))
        text = text[:at] + draw(st.one_of(st.text(max_size=20), st.sampled_from(ODD_TEXT))) + text[at + cut:]
    return text


def documents(text: str, paths: list[tuple[Any, ...]]) -> st.SearchStrategy[str]:
    raw = st.one_of(st.text(max_size=200), st.builds(yaml.safe_dump, values))
    return st.one_of(mutated(text, paths), spliced(text), raw)


def _check_load(path: Path, text: str, load: Callable[[Path], Any], kind: type, counter: list[int]) -> None:
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    started = time.monotonic()
    try:
        loaded = load(path)
    except UserError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ") and len(message.splitlines()) == 1, repr(message)
        assert "\r" not in message and "\n" not in message, repr(message)
    else:
        assert isinstance(loaded, kind)
        resolved = loaded.resolved()
        assert validate(kind, resolved, path) == loaded  # what snapshot.json / MLflow store loads back as itself
        assert len(loaded.sha256) == 64
        counter[1] += 1
    elapsed = time.monotonic() - started
    assert elapsed < PER_EXAMPLE_SECONDS, f"{elapsed:.1f} s for {text[:200]!r}"
    counter[0] += 1


def run_fuzz(run: Callable[[], None], counter: list[int], label: str) -> None:
    """One Hypothesis run (make test), or fresh runs until FUZZ_SECONDS_EACH are spent (make fuzz)."""
    started = time.monotonic()
    run()
    while time.monotonic() - started < FUZZ_SECONDS_EACH:
        run()
    valid = f" ({counter[1]} loaded as valid, the rest refused in one line)" if len(counter) > 1 else ""
    print(f"\n{label}: {counter[0]} examples in {time.monotonic() - started:.1f} s{valid}")


def fuzz_settings() -> settings:
    return settings(
        max_examples=EXAMPLES_PER_RUN if not FUZZ_SECONDS_EACH else 500, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


FUZZ_TARGETS = {
    "specs": (SPEC_TEXT, SPEC_PATHS, SPEC_NAME, load_spec, DatasetSpec),
    "recipes": (RECIPE_TEXT, RECIPE_PATHS, RECIPE_NAME, load_recipe, Recipe),
}


@pytest.mark.parametrize("target", sorted(FUZZ_TARGETS))
def test_fuzz_config_files(tmp_path_factory, target):
    text, paths, name, load, kind = FUZZ_TARGETS[target]
    folder, counter = tmp_path_factory.mktemp(f"fuzz-{target}"), [0, 0]

    @fuzz_settings()
    @given(documents(text, paths))
    def one(document: str) -> None:
        _check_load(folder / f"{name}.yaml", document, load, kind, counter)

    run_fuzz(one, counter, target)
    assert counter[0] >= EXAMPLES_PER_RUN


def test_fuzz_raw_bytes(tmp_path_factory):
    """Bytes that may not be UTF-8 at all, for both loaders."""
    folder, counter = tmp_path_factory.mktemp("fuzz-bytes"), [0]

    @fuzz_settings()
    @given(st.binary(max_size=300), st.booleans())
    def one(data: bytes, as_spec: bool) -> None:
        path = folder / (f"{SPEC_NAME}.yaml" if as_spec else f"{RECIPE_NAME}.yaml")
        path.write_bytes(data)
        try:
            (load_spec if as_spec else load_recipe)(path)
        except UserError as exc:
            assert len(str(exc).splitlines()) == 1
        counter[0] += 1

    run_fuzz(one, counter, "raw bytes")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"lora\nrank": 1}, "'lora\\nrank': unknown field"),
        ({"eval_weights": [1, "x", None, []]}, "eval_weights[1]: expected a number (got 'x', text)"),
        ({"seed": 10**50}, "seed: must be at most 4294967295 (got 1000000000000000000000000000000000000...)"),
        ({"a": 1, "b": 2, "c": 3, "d": 4}, "; and 1 more problem"),
        ({"base_model": "x" * 2000}, "base_model: must have at most 1000 characters (got 'xxxxxxxx"),
    ],
)
def test_validation_errors_become_one_line(data, expected):
    with pytest.raises(UserError) as caught:
        validate(Recipe, {"name": "r", "base_model": "tiny-sd", **data}, Path("r.yaml"))
    message = str(caught.value)
    assert expected in message and "\n" not in message


def test_describe_names_the_file_once():
    try:
        TypeAdapter(Recipe).validate_python({"name": "r"})
    except ValueError as exc:
        assert str(describe(exc, Path("/x/r.yaml"))) == "/x/r.yaml: base_model: required field is missing"  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Marked:
    kept: int = Field(1)
    later: int = Field(0, json_schema_extra=ADDED_LATER)
    when: str = Field("", json_schema_extra=NOT_HASHED)


def test_the_hash_marks_leave_out_later_fields_at_their_default_and_never_count_unhashed_ones():
    assert later_fields(_Marked) == {"later": 0}
    assert hashed_values(_Marked, {"kept": 1, "later": 0, "when": "x"}) == {"kept": 1}
    assert hashed_values(_Marked, {"kept": 1, "later": 2, "when": "x"}) == {"kept": 1, "later": 2}
    assert "hash" not in TypeAdapter(Recipe).json_schema()["properties"]["epochs"]
