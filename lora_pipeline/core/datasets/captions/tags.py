"""Caption tags: splitting, joining, normalising a caption and placing the trigger.

Normalisation (`normalise_caption`, which decides what lands in the snapshot's .txt):

- Line breaks of any style (LF, CRLF, CR) split the text into lines; blank lines are dropped and the
  remaining lines are joined with the separator. kohya reads only the first line of a caption file,
  so a multi-line caption would silently lose everything after line one; joining keeps all the content
  and `was_multiline` tells the caller to warn (`multiline_caption`).
- Each tag (the text between separators) is stripped and its runs of whitespace collapsed to one space;
  empty tags are dropped; tags are joined with "<separator> ": "a ,b,,  c" -> "a, b, c".

Tags compare with the trigger case-insensitively (CLIP's tokenizer lowercases anyway). Training's caption
shuffle uses the same split and join, so what the linter checked is what the trainer reads.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

_WHITESPACE = re.compile(r"\s+")
CAPTION_SUFFIX = ".txt"


def caption_path(image_path: str) -> str:
    """The caption file that pairs with an image (kohya: same folder, same stem, .txt)."""
    return PurePosixPath(image_path).with_suffix(CAPTION_SUFFIX).as_posix()


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """The caption's tags: split on the separator, whitespace collapsed, empty tags dropped."""
    tags = (_WHITESPACE.sub(" ", part).strip() for part in caption.split(separator))
    return [tag for tag in tags if tag]


def join_tags(tags: list[str], separator: str = ",") -> str:
    """Inverse of split_tags for normalised tags: "a, b" for the default separator."""
    return (f"{separator} " if separator.strip() else separator).join(tags)


def normalise_caption(text: str, separator: str = ",") -> tuple[str, bool]:
    """(one-line normalised caption, whether more than one non-blank line was joined)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return join_tags(split_tags(separator.join(lines), separator), separator), len(lines) > 1


def is_trigger(tag: str, trigger: str) -> bool:
    return tag.casefold() == trigger.casefold()


def place_trigger(caption: str, trigger: str, separator: str = ",") -> str:
    """The caption with the trigger as its first tag and no other occurrence of it (`prepend_trigger`)."""
    tags = [tag for tag in split_tags(caption, separator) if not is_trigger(tag, trigger)]
    return join_tags([trigger, *tags], separator)
