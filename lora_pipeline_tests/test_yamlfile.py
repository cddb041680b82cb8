"""The safe YAML loader: size, aliases, depth, duplicate keys and tags are refused with one line, fast."""

from __future__ import annotations

import time

import pytest

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.yamlfile import MAX_DEPTH, MAX_YAML_BYTES, load_yaml_mapping

BILLION_LAUGHS = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    + ["intent: *i"]
)


def _load(tmp_path, text: str | bytes):
    path = tmp_path / "s.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return load_yaml_mapping(path)


def _refused(tmp_path, text: str | bytes, *needles: str, within: float = 2.0) -> str:
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        _load(tmp_path, text)
    assert time.monotonic() - started < within
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "s.yaml"))
    for needle in needles:
        assert needle in message, message
    return message


def test_plain_data_loads_and_dates_stay_text(tmp_path):
    data = _load(tmp_path, "name: v1\nwhen: 2026-10-01\nn: 3\nx: 2.5\nok: true\nnone: null\nl: [a, {b: c}]\n")
    assert data == {"name": "v1", "when": "2026-10-01", "n": 3, "x": 2.5, "ok": True, "none": None,
                    "l": ["a", {"b": "c"}]}


def test_alias_bomb_in_intent_is_refused_at_once(tmp_path):
    _refused(tmp_path, BILLION_LAUGHS, "aliases", within=1.0)


def test_even_a_single_alias_is_refused(tmp_path):
    _refused(tmp_path, "a: &x [1]\nb: *x\n", "aliases", "line 2")


def test_a_50_mb_spec_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "s.yaml"
    with open(path, "wb") as f:
        f.write(b"name: big\nintent: ")
        f.truncate(50_000_000)
    started = time.monotonic()
    with pytest.raises(UserError, match=f"larger than the limit of {MAX_YAML_BYTES:,} bytes"):
        load_yaml_mapping(path)
    assert time.monotonic() - started < 1.0


def test_duplicate_keys_are_refused(tmp_path):
    _refused(tmp_path, "merge: true\nrepeats: 2\nmerge: false\n", "duplicate key 'merge'", "line 3")
    _refused(tmp_path, "captions:\n  from: table\n  'from': sidecar\n", "duplicate key 'from'")


def test_deep_nesting_is_refused(tmp_path):
    _refused(tmp_path, "a: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5), f"deeper than {MAX_DEPTH}")
    _refused(tmp_path, "a: " + "[" * 100_000, within=5.0)  # unbalanced and deep: invalid, not a crash


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("a: !!set {x, y}\n", "!!set"),
        ("a: !!binary aGVsbG8=\n", "!!binary"),
        ("a: !!python/object/apply:os.system [ls]\n", "!!python/object/apply:os.system"),
        ("<<: {a: 1}\n", "merge keys"),
        ("1: one\n", "keys must be plain text"),
        ("? [a]\n: 1\n", "keys must be plain text"),
        ("a: " + "9" * 5000 + "\n", "invalid YAML value"),
        ("a: [1\n", "invalid YAML at line"),
        ("--- a\n--- b\n", "invalid YAML"),
        ("- a\n- b\n", "mapping of fields at the top level"),
        ("", "mapping of fields at the top level"),
        ("a: \x00\n", "invalid YAML"),
        (b"a: caf\xe9\n", "not UTF-8"),
    ],
)
def test_what_is_not_plain_data_is_one_line(tmp_path, text, needle):
    _refused(tmp_path, text, needle)


def test_a_folder_or_missing_file_is_one_line(tmp_path):
    (tmp_path / "d.yaml").mkdir()
    with pytest.raises(UserError, match="expected a file"):
        load_yaml_mapping(tmp_path / "d.yaml")
    with pytest.raises(UserError, match="file not found"):
        load_yaml_mapping(tmp_path / "none.yaml")
