"""What `lora-pipeline provenance` prints: provenance.py's chain as an indented text tree, the per-batch summary
first: a 2,000-image dataset reads as a few lines (batch, images, captions and where they came from, source files
changed since), the per-image rows only with `--files`. `--json` keeps every image and adds these rows as
`batch_summary`. A batch's row carries its rights when the version was built and now, and whether it is retired
(source_flags.py); the text says what changed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from lora_pipeline.core.errors import printable
from lora_pipeline.core.lineage.provenance import ProvenanceChain, SourceLink
from lora_pipeline.core.lineage.provenance_start import start_lines


def _short(digest: str | None) -> str:
    return f"{digest[:12]}…" if digest else "?"


def _source_line(label: str, link: SourceLink) -> str:
    return f"{label}: {link.kind} {link.name}: {link.path} (sha256 {_short(link.sha256)}, {link.status})"


def format_provenance(chain: ProvenanceChain, files: bool = True, summary: Sequence[str] = ()) -> str:
    """A readable, indented text tree of `trace_lora`'s chain for the command line: the `summary` lines (the
    per-batch summary below), then, with `files`, every image with its caption and source files."""
    lora, recipe, dataset, base = chain.lora, chain.recipe, chain.dataset, chain.base_model
    training = lora.training
    lines = [
        f"LoRA {lora.path}",
        f"  sha256 {lora.sha256}",
        f"  epoch {lora.epoch} of {training.get('ss_num_epochs', '?')}, step {training.get('ss_steps', '?')}, "
        f"dim {training.get('ss_network_dim', '?')} alpha {training.get('ss_network_alpha', '?')}, "
        f"{training.get('ss_base_model_version', '?')}",
        f"recipe {recipe.name} (sha256 {_short(recipe.sha256)}): {recipe.file} {recipe.file_status}",
        f"dataset {dataset.version} at {dataset.path}",
        f"  manifest root {dataset.header_manifest_root} (in the LoRA header)",
    ]
    if dataset.snapshot_manifest_root is not None:
        lines.append(f"  manifest root {dataset.snapshot_manifest_root} (in snapshot.json)")
        state = "verified" if dataset.verified else "DOES NOT MATCH its manifest"
        lines.append(f"  snapshot {state} ({dataset.files_checked} files re-hashed)")
    lines.append(f"  {len(chain.images)} images, from:")
    lines += summary
    for image in chain.images if files else ():
        size = f"{image.width}x{image.height}" if image.width else "size unknown"
        lines.append(f"    {image.path} ({size}, sha256 {_short(image.sha256)})")
        caption = image.caption
        if caption:
            lines.append(f"      caption: {caption.text}")
        lines.append("      " + _source_line("from", image.source))
        if image.origin:
            lines.append("      " + _source_line("origin", image.origin))
        if caption and caption.source:
            src = caption.source
            lines.append(f"      caption source {caption.caption_source} (sha256 {_short(src.sha256)}, {src.status})")
        if image.mask:
            lines.append("      " + _source_line(f"mask {image.mask.path}", image.mask.source))
    if not summary:  # a summary says the same per batch
        lines += [line for flags in chain.batches for line in flags.lines]
    lines += [
        f"base model {base.name}: {base.source} (U-Net sha256 {_short(base.hash)}, {base.status})",
        f"code commit {chain.code_commit}",
        f"MLflow run {chain.mlflow.run_id} in {chain.mlflow.tracking_uri}",
    ]
    lines += start_lines(chain.from_lora, lambda sub: format_provenance(ProvenanceChain.model_validate(sub), False))
    if chain.status == "ok":
        lines.append("status: ok, every link checks out")
    else:
        lines.append(f"status: {len(chain.status)} finding(s)")
        lines += [f"  - {finding}" for finding in chain.status]
    return "\n".join(printable(line) for line in lines)  # captions and header values are untrusted text


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
