"""The per-batch summary that `lora-pipeline provenance` prints first: a 2,000-image dataset reads as a few lines
(batch, images, captions and where they came from, source files changed since), the per-image rows only with
`--files`. `--json` keeps every image and adds these rows as `batch_summary`. A batch's row carries its rights
when the version was built and now, and whether it is retired (source_flags.py); the text says what changed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from lora_pipeline.core.lineage.provenance import ProvenanceChain, format_provenance


def batch_summary(chain: ProvenanceChain) -> list[dict[str, Any]]:
    """One row per source the images first came from (`batch:<id>`, or `dataset:<version>` for a version written
    before origins were recorded): images, captions, captions by kind of source, files changed or missing since,
    and for a batch its rights when the version was built and now, and its retirement (`chain.batches`)."""
    flags = {f"batch:{f.batch}": f for f in chain.batches}
    rows: dict[str, dict[str, Any]] = {}
    kinds: dict[str, Counter[str]] = {}
    for image in chain.images:
        origin = image.origin or image.source  # an image reused from a version: the batch it came from
        key = f"{origin.kind}:{origin.name}"
        row = rows.setdefault(key, {"source": key, "images": 0, "captions": 0, "changed_or_missing": 0})
        row["images"] += 1
        row["changed_or_missing"] += origin.status != "unchanged"
        if image.caption is not None:
            row["captions"] += 1
            kinds.setdefault(key, Counter())[(image.caption.caption_source or "?").split(":")[0]] += 1
    for key, row in rows.items():
        row["caption_sources"] = dict(sorted(kinds.get(key, Counter()).items()))
        if key in flags:
            row["rights"] = flags[key].rights_at_build.label
            row["rights_now"] = flags[key].rights_now.label
            row["retired"] = flags[key].retired is not None
    return list(rows.values())


def summary_lines(chain: ProvenanceChain, indent: str = "  ") -> list[str]:
    """The summary as text: one line per source, with a batch's rights when the version was built (what changed
    since, and a retirement, follow in the chain's batch lines)."""
    flags = {f"batch:{f.batch}": f for f in chain.batches}
    lines = []
    for row in batch_summary(chain):
        kinds = ", ".join(f"{n} {kind}" for kind, n in row["caption_sources"].items())
        changed = row["changed_or_missing"]
        state = "unchanged" if not changed else f"{changed} changed or missing (see the findings)"
        lines.append(
            f"{indent}{row['source']}: {row['images']} images, {row['captions']} captions"
            f"{f' ({kinds})' if kinds else ''}; source files {state}"
        )
        if row["source"] in flags:
            lines.append(f"{indent}  rights when built: {row['rights']}")
            lines += [f"{indent}{line}" for line in flags[row["source"]].lines[1:]]  # changed since, retired
    return lines


def format_with_summary(chain: ProvenanceChain, files: bool = False) -> str:
    """What `lora-pipeline provenance` prints: the chain with the summary per batch, every image only with `files`."""
    return format_provenance(chain, files=files, summary=summary_lines(chain, indent="    "))
