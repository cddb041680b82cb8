"""Reading the user's YAML files with errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lora_pipeline.core.errors import UserError


def load_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError("file not found", path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text", path) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"invalid YAML{where}: {getattr(exc, 'problem', exc)}", path) from None
    if not isinstance(data, dict):
        raise UserError("expected a mapping of fields at the top level", path)
    return data


def reject_unknown(data: dict[str, Any], known: set[str], path: Path, where: str = "") -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"unknown field{'s' if len(unknown) > 1 else ''} {where}{', '.join(unknown)}", path)
