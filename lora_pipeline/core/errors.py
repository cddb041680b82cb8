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
