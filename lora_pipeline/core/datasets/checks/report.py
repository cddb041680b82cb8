"""The dataset report: report.json (machines), report.md (a person, in the Dagster UI), contact_sheet.png."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path, PurePath
from typing import Any, Protocol

from lora_pipeline.core.datasets.captions.review import write_review_page
from lora_pipeline.core.datasets.checks.contact_sheet import MAX_IMAGES, write_contact_sheet
from lora_pipeline.core.datasets.checks.validation import CaptionPlanLike, ValidationResult
from lora_pipeline.core.datasets.problems import Problem
from lora_pipeline.core.fileio import atomic_write_text, write_json
from lora_pipeline.core.paths import CONTACT_SHEET, REPORT_JSON, REPORT_MD
from lora_pipeline.core.schema import Record

MD_PROBLEM_ROWS = 100
MD_TOP_TAGS = 25
MD_LIST_ITEMS = 30
BAR_WIDTH = 30
LINT_LABELS = {"oov_terms": "out-of-vocabulary terms"}


class ReportCaptionPlan(CaptionPlanLike, Protocol):
    """What the report reads from captions.plan_captions' CaptionPlan, besides captions and problems."""

    tag_frequency: Mapping[str, Mapping[str, int]]  # kohya ss_tag_frequency: image folder -> tag -> count
    lint: Mapping[str, Any]  # caption_lint's stats: oov_terms, banned_hits, shared_captions, ...


class Report(Record):
    """report.json: the validation of one snapshot, which the training gate reads. A function of the snapshot alone
    (no timestamp), so an unchanged snapshot (and unchanged bucket settings of the recipes that train on it) gets a
    byte-identical report and rebuilding leaves the files untouched.

    `report_data` fills every field; the defaults are what a reader assumes of a report that lacks one (a report
    without `passed` has not passed).
    """

    version: str
    manifest_root: str | None = None  # of the snapshot as validated: the report is stale once the snapshot's moves
    passed: bool = False
    counts: dict[str, Any] = {}  # images, captions, pairs, ..., problems by severity and code
    checks: dict[str, Any] = {}  # the spec's checks, as applied
    problems: list[Problem] = []
    buckets: dict[str, Any] = {}  # validation.bucket_summary of the recipes that train on the family
    other_buckets: list[dict[str, Any]] = []  # further bucket settings of those recipes, one summary each
    tag_frequency: dict[str, dict[str, int]] = {}
    lint: dict[str, Any] = {}
    contact_sheet: str | None = None
    rights_by_batch: dict[str, Any] = {}  # origin batch -> its rights when the snapshot was built


def read_report(snapshot_dir: Path) -> Report:
    return Report.read(snapshot_dir / REPORT_JSON)


@dataclass(frozen=True)
class ReportFiles:
    report_json: Path
    report_md: Path
    contact_sheet: Path
    review_page: Path  # review.html: captions, thumbnails and findings for a person
    markdown: str  # report.md's text, for Dagster metadata
    passed: bool


def to_plain(value: Any) -> Any:
    """Dataclasses, mappings, sequences, sets and paths as JSON-ready data (sets sorted)."""
    if is_dataclass(value) and not isinstance(value, type):
        return to_plain(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((to_plain(v) for v in value), key=str)
    if isinstance(value, PurePath):
        return value.as_posix()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in {REPORT_JSON}")


def report_data(result: ValidationResult, caption_plan: ReportCaptionPlan) -> Report:
    """report.json's content: a function of the snapshot and the bucket settings of the recipes that train on it
    (no timestamp), so while those stay the same the report is byte-identical and rebuilding leaves the files
    untouched."""
    return Report(
        version=result.version,
        manifest_root=result.manifest_root,
        passed=result.passed,
        counts=result.counts,
        checks=result.checks,
        problems=result.problems,
        buckets=result.buckets,
        other_buckets=result.other_buckets,
        tag_frequency=to_plain(caption_plan.tag_frequency),
        lint=to_plain(caption_plan.lint),
        contact_sheet=CONTACT_SHEET,
        rights_by_batch=result.rights_by_batch,
    )


def write_report(
    snapshot_dir: Path, result: ValidationResult, caption_plan: ReportCaptionPlan, max_images: int = MAX_IMAGES
) -> ReportFiles:
    """Write the contact sheet, report.json, report.md and the review page into the snapshot folder, each
    atomically."""
    captions = {str(k): v for k, v in caption_plan.captions.items()}
    sheet = write_contact_sheet(snapshot_dir / CONTACT_SHEET, snapshot_dir, result, captions, max_images)
    report = report_data(result, caption_plan)
    write_json(snapshot_dir / REPORT_JSON, report.to_json_dict(), readonly=True)
    markdown = render_markdown(report, sheet.shown)
    atomic_write_text(snapshot_dir / REPORT_MD, markdown, readonly=True)
    review_page = write_review_page(snapshot_dir, captions, result.problems)
    return ReportFiles(
        report_json=snapshot_dir / REPORT_JSON,
        report_md=snapshot_dir / REPORT_MD,
        contact_sheet=sheet.path,
        review_page=review_page,
        markdown=markdown,
        passed=result.passed,
    )


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]], align: str = "") -> list[str]:
    aligns = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in aligns]
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(rule) + " |",
        *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows),
    ]


def _lint_lines(name: str, value: Any) -> list[str]:
    """A lint statistic as markdown: scalars inline, {term: n} as a list, shared captions as bullets."""
    if isinstance(value, Mapping):
        entries = [f"{k} ({v})" for k, v in value.items()]
        shown = ", ".join(entries[:MD_LIST_ITEMS]) + (
            f" ...and {len(entries) - MD_LIST_ITEMS} more" if len(entries) > MD_LIST_ITEMS else ""
        )
        return ["", f"**{name}**: {shown or 'none'}"]
    if isinstance(value, list):
        lines = ["", f"**{name}** ({len(value)}):"] if value else ["", f"**{name}**: none"]
        for entry in value[:MD_LIST_ITEMS]:
            if isinstance(entry, Mapping) and "caption" in entry:
                lines.append(f"- {entry.get('count', '?')} images: `{_cell(entry['caption'])}`")
            else:
                lines.append(f"- {_cell(entry)}")
        if len(value) > MD_LIST_ITEMS:
            lines.append(f"- ...and {len(value) - MD_LIST_ITEMS} more in {REPORT_JSON}")
        return lines
    return ["", f"**{name}**: {value}"]


def bucket_lines(buckets: Mapping[str, Any]) -> list[str]:
    """A bucket summary (validation.bucket_summary) as a section: whose settings, then the histogram."""
    sides = (f"sides {buckets['min_bucket_reso']}-{buckets['max_bucket_reso']} px" if buckets["enable_bucket"]
             else "enable_bucket: false, every image square")
    recipes = ", ".join(f"`{name}`" for name in buckets["recipes"])
    whose = (f"The buckets of the recipes whose `train_on` names this family: {recipes} ({sides})." if recipes
             else f"No recipe's `train_on` names this family: the recipe defaults ({sides}).")
    hist = buckets["histogram"]
    peak = max((b["count"] for b in hist), default=0)
    bar_rows = [
        [*([b["resolution"]] if "resolution" in b else []), f"{b['width']}x{b['height']}", b["count"],
         "#" * max(1, round(BAR_WIDTH * b["count"] / peak))] for b in hist
    ]
    multi = buckets.get("resolutions")  # multi-resolution: each image once per side
    side = f"resolutions {', '.join(map(str, multi))}" if multi else f"resolution {buckets['resolution']}"
    head, align = (["side", "bucket", "images", ""], "rlrl") if multi else (["bucket", "images", ""], "lrl")
    return [
        "", f"## Aspect-ratio buckets ({side}, step {buckets['bucket_reso_steps']})", "",
        whose, "", *(_table(head, bar_rows, align) if hist else ["No decodable images."]),
    ]


def _rights_lines(report: Report) -> list[str]:
    """The Rights section: images by rights, then each origin batch's terms when the version was built."""
    by_rights = report.counts.get("by_rights") or {}
    if not by_rights:
        return []
    out = ["## Rights", "", *_table(["rights", "images"], [[k, v] for k, v in by_rights.items()], "lr"), ""]
    terms = [[b, t["rights"], t.get("licence", ""), t.get("holder", ""), t.get("record", 0)]
             for b, t in report.rights_by_batch.items()]
    if terms:
        out += [*_table(["batch", "rights", "licence", "holder", "record"], terms, "llllr"), ""]
    if "unknown" in by_rights:
        out += [f"{by_rights['unknown']} images have unknown rights (marked `rights?` on the contact sheet): "
                "record them with `lora-pipeline rights batch:<id> --rights ...` or a `_RIGHTS.yaml`.", ""]
    return out


def render_markdown(report: Report, shown: int) -> str:
    counts = report.counts
    errors, warnings = counts["problems"]["error"], counts["problems"]["warning"]
    verdict = "**PASSED**" if report.passed else "**FAILED** (training is blocked)"
    out = [
        f"# Dataset report: {report.version}",
        "",
        f"{verdict}: {errors} errors, {warnings} warnings; {counts['images']} images, "
        f"{counts['captions']} captions, {counts['pairs']} pairs; manifest root `{report.manifest_root[:16]}…`",
        "",
        "## Counts",
        "",
    ]
    rows = [[k.replace("_", " "), v] for k, v in counts.items() if isinstance(v, int)]
    rows += [[f"from {source}", n] for source, n in counts["by_source"].items()]
    rows += [[f"regularisation in {folder}", n] for folder, n in counts.get("regularisation_by_folder", {}).items()]
    out += [*_table(["", "count"], rows, "lr"), ""]

    out += _rights_lines(report)
    problems = report.problems
    out += [f"## Problems ({len(problems)})", ""]
    if problems:
        shown_rows = [
            [p["severity"], p["code"], f"{p['scope']}/{p['file']}" if p["file"] else p["scope"], p["message"]]
            for p in problems[:MD_PROBLEM_ROWS]
        ]
        out += _table(["severity", "code", "file", "message"], shown_rows)
        if len(problems) > MD_PROBLEM_ROWS:
            out += ["", f"...and {len(problems) - MD_PROBLEM_ROWS} more in {REPORT_JSON}."]
    else:
        out.append("None.")

    for buckets in [report.buckets, *report.other_buckets]:
        out += bucket_lines(buckets)

    tags: Counter[str] = Counter()
    for folder_tags in report.tag_frequency.values():
        tags.update(folder_tags)
    top = sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))[:MD_TOP_TAGS]
    out += ["", f"## Top tags ({len(tags)} distinct)", ""]
    out += _table(["tag", "captions"], [list(kv) for kv in top], "lr") if top else ["No tags."]

    out += ["", "## Caption lint"]
    for key, value in sorted(report.lint.items(), key=lambda kv: (kv[0] != "oov_terms", kv[0])):
        out += _lint_lines(LINT_LABELS.get(key, key.replace("_", " ")), value)
    out += [
        "",
        "## Contact sheet",
        "",
        f"`{CONTACT_SHEET}` in the snapshot folder shows {shown} of {counts['images']} images as training sees "
        "them, with file names and captions; problem images are outlined (red = error, orange = warning), and a "
        "loss mask's edge is drawn in light blue.",
        "",
    ]
    return "\n".join(out)
