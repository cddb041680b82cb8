"""Metadata helpers shared by the assets: images the UI renders, tables, previews."""


import base64
import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg
from PIL import Image

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


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], limit: int = 200) -> dg.MetadataValue:
    """A Dagster table of the first `limit` rows (cells rendered as text where not numbers)."""
    schema = dg.TableSchema(columns=[dg.TableColumn(name=c) for c in columns])
    records = []
    for row in rows[:limit]:
        records.append(dg.TableRecord({c: _cell(row.get(c)) for c in columns}))
    return dg.MetadataValue.table(records=records, schema=schema)


def _cell(value: Any) -> int | float | str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return "" if value is None else str(value)
