"""The README's table of environment variables, generated from the settings class (lora_pipeline/core/settings.py).

`make docs` rewrites the table between its two marker comments in README.md; a test asserts the README's table
equals what this module renders, so the table cannot drift from the variables the code reads.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lora_pipeline.core.paths import REPO_ROOT
from lora_pipeline.core.settings import Settings, env_name

README = REPO_ROOT / "README.md"
BEGIN = "<!-- settings table: `make docs` writes it from lora_pipeline/core/settings.py -->"
END = "<!-- end of the settings table -->"


def _default(value: object) -> str:
    if value is None:
        return "unset"
    return f"`{value}`" if value != "" else "empty"


def render_settings_table() -> str:
    """One row per setting: its variable, default and meaning."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{env_name(name)}` | {_default(field.default)} | {meaning} |")
    return "\n".join(lines) + "\n"


def _parts(text: str) -> tuple[str, str, str]:
    """(before the table, the table, after it) of the README's text."""
    head, begin, rest = text.partition(BEGIN + "\n")
    table, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"README.md lacks the settings table's markers {BEGIN!r} and {END!r}")
    return head + begin, table, end + tail


def readme_table(text: str) -> str:
    return _parts(text)[1]


def with_table(text: str) -> str:
    """The README's text with the rendered table between the markers."""
    head, _, tail = _parts(text)
    return head + render_settings_table() + tail


def main(argv: list[str]) -> int:
    target = Path(argv[0]) if argv else README
    target.write_text(with_table(target.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote the settings table in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
