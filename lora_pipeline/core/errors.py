"""The one exception type that means "the user gave us something wrong".

The CLI prints `str(error)` as a single line and exits 1; Dagster assets let it
propagate so the run fails with the same message. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import unicodedata
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


# Bidirectional overrides and isolates: they reorder what a terminal shows (a file name that reads backwards).
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def is_control(ch: str) -> bool:
    """A character a terminal acts on instead of showing: C0 and C1 controls (ESC, CR, NUL, DEL ...), line and
    paragraph separators, and bidirectional overrides."""
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in _BIDI


def printable(text: str, keep: str = "") -> str:
    """`text` safe to write to a terminal: each control character (`is_control`) becomes a visible escape
    (`\\x1b`, `\\r`), except those in `keep` (the CLI keeps its own newlines). Everything read from a user's file
    (captions, header values, file names) is printed through this."""
    if text.isprintable():
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii") if is_control(ch) and ch not in keep else ch
                   for ch in text)
