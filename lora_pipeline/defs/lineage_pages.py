"""The lineage the asset graph cannot draw, as markdown pages the UI renders (defs/partitions.py says why).

A version's `dataset_snapshot` page lists the batches it took (images, directly or through which earlier
version) with links to their `source_batch` pages. A batch's page lists the versions that took it, with links to
their pages and to the training partitions that trained a LoRA on them: in the batch's own materialization and,
whenever a version that took it is built later, in an observation of the batch that the version's run records
(the batch's page shows the latest). A training partition whose version is blocked gets an observation saying so
and linking the version's report.

A retired batch (core/datasets/sources/retired.py) is flagged: its page says who retired it, when and why, above
every version (and LoRA) built on it, and the page of a version built on it names it. Pages are written when
they are recorded: a batch's page when it is fingerprinted and whenever a version that took it is built or
trained, a version's page when it is built. A retirement after that shows on the batch's page from its next
refresh, and on a version's page built before it not at all; `lora-pipeline lineage` reads the retirement
records at every query.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

import dagster as dg

from lora_pipeline.core.datasets.sources.retired import RetirementRecord, retired_batches, retirement
from lora_pipeline.core.lineage.batch_links import DIRECT, BatchUse, versions_taking
from lora_pipeline.core.paths import REPORT_MD, DataRoot
from lora_pipeline.defs.partitions import training_key

LINEAGE = "lineage"  # the metadata key of the pages
OBSERVED = ("source_batch",)


def page_url(asset: str, partition: str) -> str:
    """An asset partition's page in the UI, relative to the webserver's root: its latest event for a batch (whose
    page the observations keep up to date), its latest materialization for the others."""
    view = "events" if asset in OBSERVED else "partitions"
    return f"/assets/{asset}?view={view}&partition={quote(partition, safe='')}"


def page_link(asset: str, partition: str, text: str | None = None) -> str:
    return f"[{text or partition}]({page_url(asset, partition)})"


def _through(use: BatchUse) -> str:
    return ", ".join(t if t == DIRECT else page_link("dataset_snapshot", t) for t in sorted(use.through))


def _trained(root: DataRoot, version: str) -> str:
    """Links to the training partitions of the version that hold LoRA files."""
    if not root.loras_root.joinpath(version).is_dir():
        return ""
    recipes = sorted(p.name for p in root.loras_root.joinpath(version).iterdir() if any(p.glob("*.safetensors")))
    return ", ".join(page_link("lora_epochs", training_key(version, r), r) for r in recipes)


def _retired_line(batch: str, record: RetirementRecord) -> str:
    return f"**RETIRED: `{batch}`** was {record.line}"


def version_page(root: DataRoot, version: str, uses: Mapping[str, BatchUse]) -> dict[str, dg.MetadataValue]:
    """`dataset_snapshot` metadata: the batches the version took, the retired ones flagged."""
    retired = {b: r for b, r in retired_batches(root).items() if b in uses}
    lines = [f"### Batches `{version}` took", ""]
    lines += [f"{_retired_line(b, r)}; `{version}` is built on it.\n" for b, r in retired.items()]
    lines += ["| batch | images | through |", "|---|---|---|"]
    lines += [
        f"| {page_link('source_batch', b)}{' RETIRED' if b in retired else ''} | {u.images} | {_through(u)} |"
        for b, u in uses.items()
    ]
    return {
        LINEAGE: dg.MetadataValue.md("\n".join(lines) if uses else f"`{version}` took no batch"),
        "batches": dg.MetadataValue.json(sorted(uses)),
        "retired_batches": dg.MetadataValue.json(sorted(retired)),
    }


def batch_page(root: DataRoot, batch: str, uses: Mapping[str, BatchUse]) -> dict[str, dg.MetadataValue]:
    """`source_batch` metadata: the built versions that took the batch and the LoRAs trained on them; a retired
    batch's page says so first."""
    record = retirement(root, batch)
    flag = [_retired_line(batch, record), ""] if record else []
    lines = [f"### Versions that took `{batch}`", ""]
    if record:
        flag[0] += "; every version below and the LoRAs trained on them are built on it."
    lines += [*flag, "| version | images | through | LoRAs trained on it |", "|---|---|---|---|"]
    lines += [
        f"| {page_link('dataset_snapshot', v)} | {u.images} | {_through(u)} | {_trained(root, v)} |"
        for v, u in uses.items()
    ]
    text = "\n".join(lines if uses else [*flag, f"No built version took `{batch}` yet."])
    page = {LINEAGE: dg.MetadataValue.md(text), "versions": dg.MetadataValue.json(sorted(uses))}
    return {**page, **({"retired": dg.MetadataValue.json(record.to_json_dict())} if record else {})}


def batch_pages(root: DataRoot, batches: list[str]) -> dict[str, dict[str, dg.MetadataValue]]:
    """{batch: its page} for the batches, the snapshots read once for all of them."""
    return {b: batch_page(root, b, uses) for b, uses in versions_taking(root, batches).items()}


def batch_observations(root: DataRoot, batches: list[str]) -> list[dg.AssetObservation]:
    """The batches' pages brought up to date, as observations of `source_batch` a run records."""
    return [
        dg.AssetObservation(asset_key="source_batch", partition=b, metadata=page)
        for b, page in batch_pages(root, batches).items()
    ]


def blocked_observation(root: DataRoot, version: str, recipe: str, reason: str) -> dg.AssetObservation:
    """An observation of the training partition: it is not trained, why, and the version's report."""
    text = (
        f"**Blocked: `{version}` is not trained.** {reason}\n\n"
        f"The report: {page_link('dataset_report', version)} (`{root.dataset(version) / REPORT_MD}`)."
    )
    return dg.AssetObservation(
        asset_key="lora_epochs",
        partition=training_key(version, recipe),
        metadata={"blocked": dg.MetadataValue.md(text), "dataset_version": version},
    )
