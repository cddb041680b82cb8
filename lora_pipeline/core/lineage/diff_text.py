"""The diff of two dataset versions as markdown: `lora-pipeline diff`'s text and the snapshot pages' "changes from
parent" (dataset_snapshot: images, batches and spec; caption_set: captions), with each list capped there."""

from __future__ import annotations

import json
from typing import Any

from lora_pipeline.core.lineage.diff import VersionDiff, diff_files, load_version
from lora_pipeline.core.paths import DataRoot


def _code(text: str) -> str:
    """`text` as a markdown code span (double backticks when it holds one), safe inside a table cell."""
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _listed(title: str, lines: list[str], limit: int | None, more: str) -> list[str]:
    if not lines:
        return []
    shown = lines if limit is None else lines[:limit]
    rest = [f"- … and {len(lines) - len(shown)} more ({more})"] if len(shown) < len(lines) else []
    return ["", f"**{title}** ({len(lines)})", "", *shown, *rest]


def _summary(diff: VersionDiff) -> str:
    parts = [
        f"{len(diff.added)} added",
        f"{len(diff.removed)} removed",
        f"{len(diff.replaced)} replaced",
        f"{len(diff.moved)} moved",
        f"{diff.unchanged} unchanged",
    ]
    captions = (
        f"{len(diff.captions_changed)} captions changed"
        if diff.captions_compared
        else "captions not compared (not recorded yet)"
    )
    return f"{', '.join(parts)}; {captions}; {len(diff.spec_changes)} spec fields changed"


def _image_sections(diff: VersionDiff, limit: int | None, more: str) -> list[str]:
    out = [
        "",
        "**Per batch** (images by the batch they entered from)",
        "",
        f"| batch | {diff.old} | {diff.new} | added | removed | replaced |",
        "|---|---|---|---|---|---|",
    ]
    out += [f"| {_code(b.batch)} | {b.old} | {b.new} | {b.added} | {b.removed} | {b.replaced} |" for b in diff.batches]
    out += _listed(
        "Added", [f"- {_code(e.path)} from {_code(f'{e.batch}/{e.source_path}')}" for e in diff.added], limit, more
    )
    out += _listed(
        "Removed",
        [f"- {_code(e.path)} (was from {_code(f'{e.batch}/{e.source_path}')})" for e in diff.removed],
        limit,
        more,
    )
    out += _listed(
        "Replaced (new content)",
        [
            f"- {_code(p.path)}{'' if p.path == p.old_path else f' (was {_code(p.old_path)})'}: sha256 "
            f"{_code(p.old_sha256[:12])} → {_code(p.sha256[:12])} from {_code(f'{p.batch}/{p.source_path}')}"
            for p in diff.replaced
        ],
        limit,
        more,
    )
    out += _listed(
        "Moved (same content, new path)", [f"- {_code(p.old_path)} → {_code(p.path)}" for p in diff.moved], limit, more
    )
    return out


def _caption_sections(diff: VersionDiff, limit: int | None, more: str) -> list[str]:
    if not diff.captions_compared:
        return ["", "Captions are compared once both versions have them (after `caption_set`)."]
    return _listed(
        "Captions changed", [f"- {_code(c.image)}: {_code(c.word_diff)}" for c in diff.captions_changed], limit, more
    )


def _spec_sections(diff: VersionDiff) -> list[str]:
    if not diff.spec_changes:
        return []

    def shown(value: Any) -> str:
        return _code(json.dumps(value, ensure_ascii=False, sort_keys=True))

    return [
        "",
        "**Spec fields changed**",
        "",
        f"| field | {diff.old} | {diff.new} |",
        "|---|---|---|",
        *(f"| {_code(c.field)} | {shown(c.old)} | {shown(c.new)} |" for c in diff.spec_changes),
    ]


def diff_markdown(diff: VersionDiff, *, images: bool = True, captions: bool = True, limit: int | None = None) -> str:
    """The diff as markdown (the command's text, the snapshot page's metadata): a summary line, then the parts
    asked for; `limit` caps each list (the rest is counted, and the command named that lists them all)."""
    more = f"`lora-pipeline diff {diff.old} {diff.new}` lists all"
    out = [f"Changes from `{diff.old}` to `{diff.new}`: {_summary(diff)}."]
    if images:
        out += _image_sections(diff, limit, more) + _spec_sections(diff)
    out += _caption_sections(diff, limit, more) if captions else ["", "Caption changes: on `caption_set`'s page."]
    return "\n".join(out) + "\n"


def parent_changes_markdown(
    root: DataRoot, version: str, *, images: bool = True, captions: bool = True, limit: int = 100
) -> str:
    """The diff of a built version against its first parent (snapshot.json `parents`), as markdown."""
    new = load_version(root, version)
    if not new.info.parents:
        return f"`{version}` has no parent version; `lora-pipeline diff OTHER {version}` compares it with any other.\n"
    parent = new.info.parents[0]
    others = new.info.parents[1:]
    note = f"\n(against its first parent; it also takes images from {', '.join(others)})\n" if others else ""
    return (
        diff_markdown(diff_files(load_version(root, parent), new), images=images, captions=captions, limit=limit) + note
    )
