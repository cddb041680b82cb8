"""The provenance link of a LoRA that started from another one (`from_lora`, run/start_lora.py): the starting
file as the header names it, re-hashed against the sha256 the header recorded, and, when it is a LoRA of this
pipeline, its own chain (traced the same way, so a LoRA continued several times shows every start). The
starting file is read as a regular file of its own folder (no link followed), like every other file of the chain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lora_pipeline.core.lineage.reads import rehash
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.schema import Record
from lora_pipeline.core.training.run.start_lora import FROM_LORA, FROM_LORA_SHA256, start_path

MAX_STARTS = 16  # starting LoRAs followed back from one file


class StartLink(Record):
    """The LoRA a file's run started from."""

    path: str  # as the header names it (relative to the data root when inside it)
    sha256: str  # as the header recorded it
    status: Literal["unchanged", "changed", "missing"]
    # its own provenance chain as `provenance --json` prints it, when it is a LoRA of this pipeline that is still there
    chain: dict[str, Any] | None = Field(None, exclude_if=lambda value: value is None)


def start_link(root: DataRoot, meta: dict[str, str], trace: Callable[[Path], dict[str, Any]],
               depth: int) -> tuple[StartLink | None, list[str]]:
    """(the header's starting LoRA, the findings about it and its own chain); (None, []) for a fresh start.
    `trace` gives a file's chain; `depth` is how many starts were followed to reach this header."""
    named = meta.get(FROM_LORA)
    if not named:
        return None, []
    recorded, path = meta.get(FROM_LORA_SHA256, ""), start_path(root, named)
    actual, why = rehash(path, path.parent)
    status: Literal["unchanged", "changed", "missing"] = "unchanged"
    findings = []
    if actual is None:
        status = "missing"
        findings.append(f"starting LoRA {named} {why}")
    elif actual != recorded:
        status = "changed"
        findings.append(f"starting LoRA {named} changed since this LoRA was trained from it")
    chain = None
    if status != "missing" and depth + 1 >= MAX_STARTS:
        findings.append(f"starting LoRA {named}: more than {MAX_STARTS} starting LoRAs in a row; not followed")
    elif status != "missing":
        chain = _own_chain(path, trace)
        sub = chain.get("status") if chain else None
        findings += [f"starting LoRA {named}: {finding}" for finding in (sub if isinstance(sub, list) else [])]
    return StartLink(path=named, sha256=recorded, status=status, chain=chain), findings


def _own_chain(path: Path, trace: Callable[[Path], dict[str, Any]]) -> dict[str, Any] | None:
    """The starting file's chain, or None when it is not a LoRA of this pipeline (a kohya file from elsewhere)."""
    from lora_pipeline.core.errors import UserError

    try:
        return trace(path)
    except UserError:
        return None


def start_lines(link: StartLink | None, nested: Callable[[dict[str, Any]], str]) -> Sequence[str]:
    """The text of the link: the starting file, then its own chain (`nested` formats it) indented."""
    if link is None:
        return []
    lines = [f"started from LoRA {link.path} (sha256 {link.sha256[:12]}…, {link.status})"]
    if link.chain is not None:
        lines += ["  | " + line for line in nested(link.chain).splitlines()]
    else:
        lines.append("  (not a LoRA of this pipeline: no chain of its own)" if link.status != "missing" else "")
    return [line for line in lines if line]
