"""The one rule for names that become a path segment or a Dagster partition key.

Batch ids, dataset versions, recipe names and trigger tokens end up as folder or file names
(`sources/<batch>/`, `datasets/<version>/img/<repeats>_<trigger>/`, `loras/<version>/<recipe>/`) and
as partition keys. Each must be one safe path segment: it starts with a letter or digit (so never
`.`, `..` or a hidden name), holds only letters, digits, `.`, `_` and `-` (so never `/`, `\\`, a NUL,
a space or a line break), and is at most `MAX_NAME_LENGTH` characters. The pattern is matched with
`fullmatch`: a trailing newline is refused too (`$` would let it through).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from lora_pipeline.core.errors import UserError

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
NAME_RE = re.compile(NAME_PATTERN)
MAX_NAME_LENGTH = 100
NAME_RULE = (
    f"one path segment of at most {MAX_NAME_LENGTH} letters, digits, '.', '_' or '-', starting with a letter or digit"
)


def name_problem(value: object) -> str | None:
    """Why `value` is not a valid name, or None when it is one."""
    if not isinstance(value, str):
        return f"expected a name, got {type(value).__name__}"
    if len(value) > MAX_NAME_LENGTH:
        return f"longer than {MAX_NAME_LENGTH} characters"
    if not NAME_RE.fullmatch(value):
        return f"{value!r} is not a name ({NAME_RULE})"
    return None


def is_name(value: object) -> bool:
    return name_problem(value) is None


def check_name(value: str) -> str:
    """`value` unchanged if it is a valid name; ValueError otherwise (for schema validators)."""
    problem = name_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def require_name(value: str, what: str) -> str:
    """`value` unchanged if it is a valid name; a one-line UserError naming `what` it should be otherwise.

    A path given where a name is expected (`build /any/dir/y`, `train ../datasets/v1`) is refused
    here, before it can select a file outside the data root.
    """
    problem = name_problem(value)
    if problem is not None:
        hint = " (give the name, not a path)" if "/" in value or "\\" in value else ""
        raise UserError(f"{what}: {problem}{hint}")
    return value


def closest_names(name: str, choices: Iterable[str]) -> str:
    """`; closest: a, b` naming up to three of `choices` that look like `name` (a typo's likely meaning), or ""."""
    close = difflib.get_close_matches(name, sorted(set(choices)), n=3, cutoff=0.6)
    return f"; closest: {', '.join(close)}" if close else ""
