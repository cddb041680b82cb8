"""Metadata helpers shared by the assets: images the UI renders, tables, previews."""


import base64
import io
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from PIL import Image

from lora_pipeline.core.schema import Record

if TYPE_CHECKING:  # provenance imports torch: only the runs that trace a LoRA file pay for it
    from lora_pipeline.core.lineage.provenance import ProvenanceChain

PROBLEM_ROWS = 200  # rows of a problems table in the metadata; counts cover all, report.json lists all


def image_markdown(path: Path, title: str, max_width: int = 960, photo: bool = False) -> dg.MetadataValue:
    """A picture as markdown with an inline data URI, so the Dagster UI shows the picture itself: a PNG, or
    with `photo` a JPEG (a contact sheet of photographs: a third of the bytes, encoded in milliseconds)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.width > max_width:
            im = im.resize((max_width, round(im.height * max_width / im.width)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        if photo:
            im.save(buf, format="JPEG", quality=85)
        else:
            im.save(buf, format="PNG", optimize=True)
    encoded = base64.b64encode(buf.getvalue()).decode("ascii")
    kind = "jpeg" if photo else "png"
    return dg.MetadataValue.md(f"**{title}** (`{path}`)\n\n![{title}](data:image/{kind};base64,{encoded})")


def problems_metadata(
    problems: Sequence[dict[str, Any]], columns: Sequence[str], report: Path, limit: int = PROBLEM_ROWS
) -> dict[str, Any]:
    """A bounded view of a problem list: counts by severity and code over all of them, the first `limit` rows
    as a table, and a line saying how many the table shows and where the full list is."""
    by_code = Counter(f"{p['severity']}: {p['code']}" for p in problems)
    shown = min(limit, len(problems))
    return {
        "problems": table(problems, columns, limit),
        "problems_by_code": dg.MetadataValue.json(dict(sorted(by_code.items()))),
        "problems_shown": f"{shown} of {len(problems)} (all of them in {report})",
    }


def table(rows: Sequence[Mapping[str, Any] | Record], columns: Sequence[str], limit: int = 200) -> dg.MetadataValue:
    """A Dagster table of the first `limit` rows, dicts or records (cells rendered as text where not numbers)."""
    schema = dg.TableSchema(columns=[dg.TableColumn(name=c) for c in columns])
    records = []
    for row in rows[:limit]:
        cells = row.to_json_dict() if isinstance(row, Record) else row
        records.append(dg.TableRecord({c: _cell(cells.get(c)) for c in columns}))
    return dg.MetadataValue.table(records=records, schema=schema)


def _cell(value: Any) -> int | float | str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return "" if value is None else str(value)


def provenance_metadata(chain: "ProvenanceChain", manifest: Path) -> dict[str, Any]:
    """The provenance chain of a LoRA file (lineage/provenance.py `trace_lora`) as metadata a partition page shows:
    the source batches with their counts, every image's source file, and the hashes that tie them together."""
    from lora_pipeline.core.lineage.provenance_text import batch_summary  # imports torch, as provenance does

    files = []
    for image in chain.images:
        origin = image.origin or image.source  # an image reused from a version: the batch it came from
        files.append({"image": image.path, "source": f"{origin.kind}:{origin.name}", "source_path": origin.path,
                      "caption_from": image.caption.caption_source if image.caption else "", "status": origin.status,
                      "sha256": image.sha256})
    per_source = [{**row, "manifest": str(manifest)} for row in batch_summary(chain)]
    dataset, recipe, base = chain.dataset, chain.recipe, chain.base_model
    status = chain.status
    return {
        "provenance": dg.MetadataValue.md(
            "ok: every link of the chain checked" if status == "ok" else "\n".join(f"- {f}" for f in status)
        ),
        "source_batches": table(per_source,
                                ["source", "images", "captions", "changed_or_missing", "manifest"]),
        "source_files": table(files, ["image", "source", "source_path", "caption_from", "status", "sha256"]),
        "manifest": dg.MetadataValue.path(str(manifest)),
        "manifest_root": dataset.snapshot_manifest_root or dataset.header_manifest_root,
        "spec_sha256": dataset.spec_sha256 or "",
        "recipe_sha256": recipe.sha256,
        "base_model": f"{base.name} ({base.source})",
        "base_model_hash": base.hash,
        # from_lora: the LoRA (of another training partition, or a file) the run started from; recorded, not a
        # Dagster dependency (lora-pipeline provenance traces its own chain)
        **({"from_lora": f"{start.path} (sha256 {start.sha256}, {start.status})"}
           if (start := chain.from_lora) is not None else {}),
    }
