"""Metadata helpers shared by the assets: images the UI renders, tables, previews."""


import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg
from PIL import Image


def image_markdown(path: Path, title: str, max_width: int = 960) -> dg.MetadataValue:
    """A PNG as markdown with an inline data URI, so the Dagster UI shows the picture itself."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.width > max_width:
            im = im.resize((max_width, round(im.height * max_width / im.width)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    encoded = base64.b64encode(buf.getvalue()).decode("ascii")
    return dg.MetadataValue.md(f"**{title}** (`{path}`)\n\n![{title}](data:image/png;base64,{encoded})")


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
