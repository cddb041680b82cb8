"""The one shape every check reports in: report.json's `problems` rows."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from typing_extensions import TypedDict  # pydantic reads typing's TypedDict only from Python 3.12

Severity = Literal["error", "warning"]


class Problem(TypedDict):
    file: str  # relative to the batch or snapshot it was found in (see scope); "" when about the whole set
    code: str  # stable snake_case identifier, e.g. "truncated_image", "missing_caption"
    severity: Severity  # errors block training; warnings do not
    message: str  # one human sentence
    scope: str  # where `file` lives: "batch:<batch id>", "dataset:<version>" (a snapshot) or "spec"


def problem(file: str, code: str, severity: Severity, message: str, scope: str) -> Problem:
    return Problem(file=file, code=code, severity=severity, message=message, scope=scope)


def errors_in(problems: Iterable[Mapping[str, Any]]) -> list[Any]:
    """The problems that block training (rows of a report.json as well as Problem dicts), in order."""
    return [p for p in problems if p.get("severity") == "error"]


def warnings_in(problems: Iterable[Mapping[str, Any]]) -> list[Any]:
    """The problems for a person to look at, which do not block training."""
    return [p for p in problems if p.get("severity") == "warning"]
