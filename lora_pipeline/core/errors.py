"""The one exception type that means "the user gave us something wrong".

The CLI prints `str(error)` as a single line and exits 1; Dagster assets let it
propagate so the run fails with the same message. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input, reported as one line that names the file."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


def one_line(error: BaseException | str, empty: str | None = None) -> str:
    """The first non-blank line of an error's message (an exception's `str`, or error text such as a Dagster
    step's), for one-line reports. A message with no text gives `empty`: by default the exception's class name,
    or "" for text."""
    text = str(error).strip()
    if text:
        return text.splitlines()[0].strip()
    if empty is not None:
        return empty
    return type(error).__name__ if isinstance(error, BaseException) else ""
