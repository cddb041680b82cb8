"""The README's table of environment variables is what the settings class renders: it cannot drift from the code."""

from __future__ import annotations

import pytest

from lora_pipeline.core.settings import Settings, env_name
from scripts.settingsdocs import BEGIN, END, README, readme_table, render_settings_table, with_table


def test_the_readme_table_equals_the_generated_one():
    assert readme_table(README.read_text(encoding="utf-8")) == render_settings_table(), "run `make docs` and commit"


def test_every_setting_has_a_row_with_its_default():
    table = render_settings_table()
    for field in Settings.model_fields:
        assert f"| `{env_name(field)}` |" in table, field
    assert "| `LORA_PIPELINE_EXECUTOR` | `default` | The executor of every job" in table
    assert "| `LORA_PIPELINE_TRAIN_PROCESSES` | `1` |" in table
    assert "| `LORA_PIPELINE_QUEUE_PREFIX` | empty |" in table


def test_make_docs_replaces_only_the_table():
    text = f"intro\n{BEGIN}\n| old |\n{END}\nrest\n"
    assert with_table(text) == f"intro\n{BEGIN}\n{render_settings_table()}{END}\nrest\n"
    with pytest.raises(ValueError, match="markers"):
        with_table("no table here\n")
