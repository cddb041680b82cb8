"""Reading caption files: UTF-8 with an optional BOM, regular files of bounded size, and the collector of the
captions a caption set finds (captions.py) with the problems met while reading them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lora_pipeline.core.datasets.problems import Problem, problem
from lora_pipeline.core.datasets.sources.regular_files import (
    CAPTION_LIMIT,
    FileTooLarge,
    NotRegularFile,
    read_regular,
)
from lora_pipeline.core.datasets.spec import DatasetSpec
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_bytes

_NOT_READ = {"symlink_not_followed": "symbolic link", "not_a_regular_file": "special file (not a regular file)"}


def decode_caption(data: bytes) -> str:
    """A caption file's or table's bytes as text: UTF-8, an optional BOM dropped (UnicodeDecodeError if not)."""
    return data.decode("utf-8-sig")


def not_utf8_message(data: bytes, exc: UnicodeDecodeError) -> str:
    """What a problem or error says of bytes that are not UTF-8: the first bad byte and its offset."""
    return f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); re-save it as UTF-8"


def read_caption_text(path: Path) -> str:
    """A caption file's text: UTF-8 with an optional BOM, a regular file of at most CAPTION_LIMIT bytes,
    else UserError naming the file."""
    try:
        data = read_regular(path, CAPTION_LIMIT)
    except FileNotFoundError:
        raise UserError("caption file not found", path) from None
    try:
        return decode_caption(data)
    except UnicodeDecodeError as exc:
        raise UserError(not_utf8_message(data, exc), path) from None


def snapshot_caption(path: Path) -> str:
    """The caption a snapshot's .txt holds, as training reads it: one line without the newline."""
    return read_caption_text(path).strip()


@dataclass
class FoundCaption:
    """A caption found for an image, where it came from and the sha256 of that file."""

    text: str  # as read, before normalisation
    source: str
    sha256: str


@dataclass
class CaptionCollector:
    """Captions found so far and the problems met on the way."""

    spec: DatasetSpec
    found: dict[str, FoundCaption] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def read_file(self, image: str, path: Path, file: str, scope: str, source: str, label: str) -> None:
        """Read the caption of `image` from `path` (`file` within `scope`, `label` in messages); what stops it
        is a problem."""
        try:
            data = read_regular(path, CAPTION_LIMIT)
        except FileNotFoundError:
            self.missing(image, f"{label} not found")
            return
        except NotRegularFile as exc:
            self.missing(image, f"{label} is a {_NOT_READ[exc.code]}; it was not read")
            return
        except FileTooLarge:
            message = f"caption file larger than {CAPTION_LIMIT:,} bytes; it was not read"
            self.problems.append(problem(file, "caption_too_large", "error", message, scope))
            return
        try:
            self.found[image] = FoundCaption(decode_caption(data), source, sha256_bytes(data))
        except UnicodeDecodeError as exc:
            self.problems.append(problem(file, "caption_not_utf8", "error", not_utf8_message(data, exc), scope))

    def missing(self, image: str, why: str) -> None:
        self.problems.append(problem(image, "missing_caption", "error", f"no caption: {why}", self.scope))

    def orphan(self, file: str, batch: str, why: str) -> None:
        self.problems.append(problem(file, "orphan_caption", "warning", why, f"batch:{batch}"))

    @property
    def scope(self) -> str:
        return f"dataset:{self.spec.name}"
