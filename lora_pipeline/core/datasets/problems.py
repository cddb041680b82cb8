"""The one shape every check reports in: report.json's `problems` rows."""

from __future__ import annotations

from typing import Literal, TypedDict

Severity = Literal["error", "warning"]


class Problem(TypedDict):
    file: str  # relative to the batch or snapshot it was found in (see scope); "" when about the whole set
    code: str  # stable snake_case identifier, e.g. "truncated_image", "missing_caption"
    severity: Severity  # errors block training; warnings do not
    message: str  # one human sentence
    scope: str  # where `file` lives: "batch:<batch id>", "dataset:<version>" (a snapshot) or "spec"


def problem(file: str, code: str, severity: Severity, message: str, scope: str) -> Problem:
    return Problem(file=file, code=code, severity=severity, message=message, scope=scope)


def has_errors(problems: list[Problem]) -> bool:
    return any(p["severity"] == "error" for p in problems)
