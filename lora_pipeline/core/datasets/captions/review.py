"""Captions reviewed by people: one row per image of a version, and the review page written beside report.md.

A review row is what a person needs to judge a caption: the image, its caption as training reads it, where the
caption came from (the manifest's `caption_source`) and every finding of the report about the image or its
caption. The same rows make the CSV of `lora-pipeline captions export` (review_io.py) and `review.html`, a static
page in the snapshot folder (sealed with the report): thumbnails (the snapshot's own images, scaled by the
browser, so the page needs no file of its own), captions, lint marks and a filter by finding (a few lines of
inline JavaScript; nothing is fetched).
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from lora_pipeline.core.datasets.captions.tags import caption_path
from lora_pipeline.core.datasets.problems import Problem
from lora_pipeline.core.datasets.snapshot.manifest import read_manifest
from lora_pipeline.core.fileio import atomic_write_text
from lora_pipeline.core.paths import REVIEW_PAGE

THUMBNAIL_PX = 160  # the longer side of a thumbnail on the page and in an export


@dataclass(frozen=True)
class ReviewRow:
    image: str  # the snapshot path of the image
    caption: str
    source: str  # the manifest's caption_source
    findings: tuple[Problem, ...]

    @property
    def codes(self) -> list[str]:
        return sorted({p["code"] for p in self.findings})


def review_rows(snapshot_dir: Path, captions: Mapping[str, str], problems: Iterable[Problem]) -> list[ReviewRow]:
    """A row per training image of the snapshot (regularisation images have class captions, nothing to review),
    with the problems whose file is the image, its caption or the source files they came from."""
    manifest = read_manifest(snapshot_dir)
    images = sorted((r for r in manifest if r.kind == "image"), key=lambda r: r.path)
    sources = {r.image: r for r in manifest if r.kind == "caption"}
    scope = f"dataset:{snapshot_dir.name}"
    owner: dict[tuple[str, str], str] = {}
    for row in images:
        owner[(scope, row.path)] = owner[(scope, caption_path(row.path))] = row.path
        if row.source_batch:
            owner[(f"batch:{row.source_batch}", row.source_path or "")] = row.path
        caption = sources.get(row.path)
        if caption is not None and caption.source_batch:
            owner[(f"batch:{caption.source_batch}", caption.source_path or "")] = row.path
    found: dict[str, list[Problem]] = {}
    for p in problems:
        image = owner.get((p["scope"], p["file"]))
        if image is not None:
            found.setdefault(image, []).append(p)
    return [
        ReviewRow(
            image=row.path,
            caption=captions.get(row.path, ""),
            source=(sources[row.path].caption_source or "") if row.path in sources else "",
            findings=tuple(found.get(row.path, [])),
        )
        for row in images
    ]


_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 6px; text-align: left; vertical-align: top; }
img { max-width: THUMBpx; max-height: THUMBpx; background: #eee; }
.error { color: #b00020; font-weight: bold; }
.warning { color: #a65e00; }
code { font-size: 12px; color: #555; }
""".replace("THUMB", str(THUMBNAIL_PX))

_SCRIPT = """
const select = document.getElementById("finding");
const shown = document.getElementById("shown");
function applyFilter() {
  const want = select.value;
  let count = 0;
  for (const row of document.querySelectorAll("#rows tbody tr")) {
    const codes = row.dataset.findings.split(" ").filter(Boolean);
    const show = want === "" || (want === "*" ? codes.length > 0 : codes.includes(want));
    row.hidden = !show;
    if (show) count += 1;
  }
  shown.textContent = count + " shown";
}
select.addEventListener("change", applyFilter);
applyFilter();
"""


def _finding_cell(findings: tuple[Problem, ...]) -> str:
    if not findings:
        return ""
    return "<br>".join(
        f'<span class="{p["severity"]}">{html.escape(p["code"])}</span> {html.escape(p["message"])}' for p in findings
    )


def render_review_page(version: str, rows: list[ReviewRow]) -> str:
    """The review page's HTML; image links are relative to the snapshot folder the page lives in."""
    counts = Counter(code for row in rows for code in row.codes)
    with_any = sum(1 for row in rows if row.findings)
    options = [
        f'<option value="">all images ({len(rows)})</option>',
        f'<option value="*">with any finding ({with_any})</option>',
    ]
    options += [
        f'<option value="{html.escape(code)}">{html.escape(code)} ({n})</option>' for code, n in sorted(counts.items())
    ]
    body = []
    for row in rows:
        body.append(
            f'<tr data-findings="{html.escape(" ".join(row.codes))}">'
            f'<td><img src="{html.escape(quote(row.image))}" loading="lazy" alt=""><br>'
            f"<code>{html.escape(row.image)}</code></td>"
            f'<td class="caption">{html.escape(row.caption)}</td>'
            f"<td><code>{html.escape(row.source)}</code></td>"
            f"<td>{_finding_cell(row.findings)}</td></tr>"
        )
    title = f"Caption review: {html.escape(version)}"
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{title}</title>",
            f"<style>{_STYLE}</style></head><body>",
            f"<h1>{title}</h1>",
            "<p>Edit captions through <code>lora-pipeline captions export</code> and <code>captions import</code>; "
            "this page only shows them.</p>",
            f'<p><label>Filter by finding: <select id="finding">{"".join(options)}</select></label> '
            '<span id="shown"></span></p>',
            '<table id="rows"><thead><tr><th>image</th><th>caption</th><th>source</th><th>findings</th></tr></thead>',
            "<tbody>",
            *body,
            "</tbody></table>",
            f"<script>{_SCRIPT}</script>",
            "</body></html>",
            "",
        ]
    )


def write_review_page(snapshot_dir: Path, captions: Mapping[str, str], problems: Iterable[Problem]) -> Path:
    """Write `review.html` into the snapshot folder, atomically and read-only; its path."""
    rows = review_rows(snapshot_dir, captions, problems)
    path = snapshot_dir / REVIEW_PAGE
    atomic_write_text(path, render_review_page(snapshot_dir.name, rows), readonly=True)
    return path
