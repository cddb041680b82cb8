"""Caption tables: the CSV or JSONL file of `captions.from: table` (columns `file` and `caption`) and of
`attributes` (`file` plus the columns that `captions.template` renders), read into a caption set's collector.

A table's `file` is the image's path relative to the batch root; row n is the n-th record counting from 1.
"""

from __future__ import annotations

import csv
import io
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_pipeline.core.datasets.captions.caption_files import (
    CaptionCollector,
    FoundCaption,
    decode_caption,
    not_utf8_message,
)
from lora_pipeline.core.datasets.problems import problem
from lora_pipeline.core.datasets.snapshot.manifest import ManifestRow
from lora_pipeline.core.datasets.sources.batches import locate_table, safe_relative
from lora_pipeline.core.datasets.sources.regular_files import CAPTION_LIMIT, TABLE_LIMIT, is_regular, read_regular
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_bytes
from lora_pipeline.core.paths import DataRoot


@dataclass
class _Table:
    batch: str
    rel: str  # path inside the batch
    path: Path
    sha256: str
    columns: set[str]
    rows: list[dict[str, str]]  # record n is rows[n - 1]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _parse_csv(text: str, path: Path) -> tuple[set[str], list[dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        if reader.fieldnames is None:
            raise UserError("caption table is empty", path)
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        for n, row in enumerate(reader, 1):
            if None in row:
                raise UserError(f"row {n} has more fields than the header (quote captions that contain commas)", path)
            rows.append({key: _cell(value) for key, value in row.items()})
    except csv.Error as exc:
        raise UserError(f"not valid CSV at line {reader.line_num}: {exc}", path) from None
    return set(reader.fieldnames), rows


def _parse_jsonl(text: str, path: Path) -> tuple[set[str], list[dict[str, str]]]:
    columns: set[str] = set()
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"line {lineno} is not valid JSON: {exc.msg}", path) from None
        except (ValueError, RecursionError):  # an integer of thousands of digits, or nesting past Python's limit
            message = f"line {lineno} is not JSON this reader accepts (a huge number or deep nesting)"
            raise UserError(message, path) from None
        if not isinstance(record, dict):
            raise UserError(f"line {lineno} is not a JSON object", path)
        columns.update(record)
        rows.append({key: _cell(value) for key, value in record.items()})
    return columns, rows


def _read_table(batch: str, rel: str, path: Path) -> _Table:
    parsers = {".csv": _parse_csv, ".jsonl": _parse_jsonl}
    parser = parsers.get(path.suffix.lower())
    if parser is None:
        raise UserError("a caption table must be .csv or .jsonl", path)
    data = read_regular(path, TABLE_LIMIT)
    try:
        text = decode_caption(data)
    except UnicodeDecodeError as exc:
        raise UserError(not_utf8_message(data, exc), path) from None
    columns, rows = parser(text, path)
    return _Table(batch, rel, path, sha256_bytes(data), columns, rows)


def _template_fields(template: str, spec_file: Path) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UserError(f"captions.template is not a valid template: {exc}", spec_file) from None
    names = [name for _, name, _, _ in parsed if name is not None]
    for name in names:
        if not name or name.isdigit() or any(c in name for c in ".[]"):
            raise UserError(f"captions.template placeholder '{{{name}}}' must name a table column", spec_file)
    return list(dict.fromkeys(names))


def _render(table: _Table, n: int, row: dict[str, str], template: str, trigger: str) -> str:
    try:
        return template.format_map({**row, "trigger": trigger})
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"captions.template cannot render row {n}: {exc}", table.path) from None


def captions_from_table(root: DataRoot, images: list[ManifestRow], out: CaptionCollector) -> None:
    """Collect the caption of each image from the spec's table (`table` or `attributes`), and the problems of
    its rows: rows without a file, outside the batch, duplicated or empty, and images the table has no row for."""
    spec = out.spec
    kind = spec.captions.source
    table = _read_table(*locate_table(root, spec))
    fields: list[str] = []
    if kind == "attributes":
        placeholders = _template_fields(spec.captions.template or "", root.spec_file(spec.name))
        fields = [name for name in placeholders if name != "trigger"]
    for column in ("file", "caption") if kind == "table" else ("file", *fields):
        if column not in table.columns:
            what = "captions.template" if column in fields else f"captions.from: {kind}"
            raise UserError(f"no column '{column}' (needed by {what})", table.path)

    folder = root.batch(table.batch)
    scope = f"batch:{table.batch}"
    by_source = {row.source_path: row.path for row in images if row.source_batch == table.batch}
    first_row: dict[str, int] = {}
    for n, row in enumerate(table.rows, 1):
        file = row.get("file", "").strip()
        where = f"row {n} of {table.rel}"
        if not file:
            out.problems.append(problem(table.rel, "table_row_without_file", "error", f"{where} has no file", scope))
            continue
        rel = safe_relative(file, folder)
        if rel is None:
            message = f"{where} names '{file}', which is outside the batch; it was not read"
            out.problems.append(problem(file, "caption_path_outside_batch", "error", message, scope))
            continue
        image = by_source.get(rel)
        if image is None:
            if not is_regular(folder / rel):
                out.orphan(rel, table.batch, f"{where} names an image that is not in the batch")
            continue
        if image in first_row:
            message = f"rows {first_row[image]} and {n} of {table.rel} both caption it"
            out.problems.append(problem(rel, "duplicate_caption_row", "error", message, scope))
            continue
        first_row[image] = n
        empty = [f for f in fields if not row.get(f, "").strip()]
        if empty:
            message = f"{where} has no value for {', '.join(empty)}"
            out.problems.append(problem(rel, "empty_attribute", "error", message, scope))
            continue
        text = (
            row.get("caption", "")
            if kind == "table"
            else _render(table, n, row, spec.captions.template or "", spec.trigger)
        )
        if len(text.encode("utf-8")) > CAPTION_LIMIT:
            message = f"{where} gives a caption larger than {CAPTION_LIMIT:,} bytes; it was not used"
            out.problems.append(problem(rel, "caption_too_large", "error", message, scope))
            continue
        out.found[image] = FoundCaption(text, f"{kind}:{table.batch}/{table.rel}#{n}", table.sha256)

    for row in images:
        if row.path in out.found or row.path in first_row:
            continue
        if row.source_batch == table.batch:
            out.missing(row.path, f"{table.batch}/{table.rel} has no row for '{row.source_path}'")
        else:
            why = f"captions come from {table.batch}/{table.rel}, but the image is from batch '{row.source_batch}'"
            out.missing(row.path, why)
