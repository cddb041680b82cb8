"""Dataset assets: source_batch -> dataset_snapshot -> caption_set -> dataset_report (+ blocking checks)."""


import collections
import functools
from pathlib import Path

import dagster as dg

from lora_pipeline.core.codeversion import code_version
from lora_pipeline.core.datasets.buckets import BucketSettings
from lora_pipeline.core.datasets.captions.captions import (
    load_caption_check,
    plan_captions,
    write_caption_check,
    write_captions,
)
from lora_pipeline.core.datasets.checks.contact_sheet import MAX_IMAGES
from lora_pipeline.core.datasets.checks.inspection import start_early
from lora_pipeline.core.datasets.checks.report import write_report
from lora_pipeline.core.datasets.checks.validation import validate_dataset
from lora_pipeline.core.datasets.problems import errors_in, warnings_in
from lora_pipeline.core.datasets.snapshot.manifest import record_captions
from lora_pipeline.core.datasets.snapshot.seal import seal_snapshot
from lora_pipeline.core.datasets.snapshot.snapshot import build_snapshot
from lora_pipeline.core.datasets.sources.arrival import record_registration
from lora_pipeline.core.datasets.sources.batches import batch_fingerprint, batch_manifest, scan_batch
from lora_pipeline.core.datasets.sources.rights import batch_rights
from lora_pipeline.core.datasets.spec import DatasetSpec, load_spec
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.lineage.batch_links import batch_uses
from lora_pipeline.core.lineage.diff_text import parent_changes_markdown
from lora_pipeline.core.lineage.lineage_index import update_index
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.training.recipe import load_recipe
from lora_pipeline.defs.failures import fails_on_user_error
from lora_pipeline.defs.lineage_pages import batch_observations, batch_pages, version_page
from lora_pipeline.defs.metadata import image_markdown, problems_metadata, table
from lora_pipeline.defs.partitions import NO_PARTITION_LINKS, dataset_versions, source_batches
from lora_pipeline.defs.placement import CPU, op_tags
from lora_pipeline.defs.report_checks import (
    COLUMNS,
    NO_ERRORS_CHECK,  # noqa: F401 (where the CLI and tests import it)
    REPORT_CHECKS,
    blocked_training,
    report_check_results,
)
from lora_pipeline.defs.resources import DataRootResource

GROUP = "datasets"
# Every asset of a dataset version: partitioned by version, in this group, on a `cpu` worker.
version_asset = functools.partial(dg.asset, partitions_def=dataset_versions, group_name=GROUP, op_tags=op_tags(CPU))
# A run tagged so executes all its steps in one process (the command line's): dataset_snapshot then starts the
# decode of the copied images, and dataset_report's validation takes the results (core/datasets/checks/inspection.py).
EARLY_INSPECTION_TAG = "lora_pipeline/early_inspection"


def _version_inputs(
    context: dg.AssetExecutionContext, data_root: DataRootResource
) -> tuple[DataRoot, DatasetSpec, Path]:
    """The data root, the spec and the snapshot folder of the partition's dataset version."""
    root = data_root.data
    spec = load_spec(root.spec_file(context.partition_key))
    return root, spec, root.dataset(spec.name)


def _training_buckets(context: dg.AssetExecutionContext, root: DataRoot, version: str) -> dict[str, BucketSettings]:
    """{recipe: its bucket settings} of the recipes whose `train_on` names the version's family: the buckets the
    report predicts are the ones those recipes will train at. A recipe that does not load is left out (warned)."""
    found = {}
    for name in root.recipe_names():
        try:
            recipe = load_recipe(root.recipe_file(name))
        except UserError as exc:
            context.log.warning(f"recipe {name} left out of the bucket histogram: {exc}")
            continue
        if recipe.automation.trains_on(version):
            found[name] = recipe.buckets
    return found


@dg.asset(
    partitions_def=source_batches,
    group_name=GROUP,
    kinds={"filesystem"},
    op_tags=op_tags(CPU),
    description="A complete source handoff under `sources/<batch>/` (marked `_READY`). Only read, never written.",
)
@fails_on_user_error
def source_batch(context: dg.AssetExecutionContext, data_root: DataRootResource) -> dg.MaterializeResult:
    scan = scan_batch(data_root.data, context.partition_key)
    rights = batch_rights(data_root.data, scan.batch)  # records a new _RIGHTS.yaml
    rows = batch_manifest(scan)
    fingerprint = batch_fingerprint(rows)  # over every file; not snapshot.json's per-source fingerprint (README)
    registration = record_registration(data_root.data, scan, fingerprint)  # a later change is refused by name
    suffixes = collections.Counter((r["path"].rsplit(".", 1)[-1].lower() if "." in r["path"] else "") for r in rows)
    context.log.info(f"batch {scan.batch}: {len(rows)} files, batch fingerprint {fingerprint}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(fingerprint),
        metadata={
            "path": dg.MetadataValue.path(str(scan.dir)),
            "files": len(rows),
            "bytes": sum(r["bytes"] for r in rows),
            "batch_fingerprint": fingerprint,
            "by_extension": dict(sorted(suffixes.items())),
            "skipped": len(scan.problems),
            "rights": rights.label,
            "manifest": table(rows, ["path", "bytes", "sha256"]),
            "registration": dg.MetadataValue.path(str(registration)),
            **batch_pages(data_root.data, [scan.batch])[scan.batch],
        },
    )


@version_asset(
    kinds={"filesystem"},
    deps=[dg.AssetDep("source_batch", partition_mapping=NO_PARTITION_LINKS)],
    description="`datasets/<version>/`: copy-only, immutable snapshot of the images named by `specs/<version>.yaml`.",
)
@fails_on_user_error
def dataset_snapshot(context: dg.AssetExecutionContext, data_root: DataRootResource) -> dg.MaterializeResult:
    root, spec, _ = _version_inputs(context, data_root)
    result = build_snapshot(root, spec, code_version())
    if context.run.tags.get(EARLY_INSPECTION_TAG) == "1":
        start_early([result.dir / r.path for r in result.rows], spec.checks.max_pixels, MAX_IMAGES)
    verb = "built" if result.created else "unchanged (rebuild is a no-op)"
    context.log.info(f"dataset {spec.name} {verb}: {len(result.rows)} images, image root {result.image_root}")
    per_source = collections.Counter(r.source_batch or r.source_dataset for r in result.rows)
    uses = batch_uses(result.rows)
    for observation in batch_observations(root, list(uses)):  # each batch's page: the versions that took it
        context.log_event(observation)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(result.image_root),
        metadata={
            **version_page(root, spec.name, uses),  # first: the page opens on it
            "path": dg.MetadataValue.path(str(result.dir)),
            "created": result.created,
            "images": len(result.rows),
            "per_source": dict(sorted(per_source.items())),
            "image_root": result.image_root,
            "intent": spec.intent,
            "changes_from_parent": dg.MetadataValue.md(parent_changes_markdown(root, spec.name, captions=False)),
            "spec_sha256": spec.sha256,
            "scan_problems": len(result.problems),
            "copy_methods": result.copy_methods,
            "files_hashed": result.hashed,
            "manifest": table(result.rows, ["path", "bytes", "width", "height", "source_batch", "source_dataset",
                                            "source_path", "sha256"]),
        },
    )


@version_asset(
    kinds={"text"},
    deps=[dataset_snapshot],
    description="The .txt caption beside every image (trigger token first), the caption rows of the manifest and "
    "captions.json (the caption problems and lint the report includes).",
)
@fails_on_user_error
def caption_set(context: dg.AssetExecutionContext, data_root: DataRootResource) -> dg.MaterializeResult:
    root, spec, snapshot_dir = _version_inputs(context, data_root)
    plan = plan_captions(root, spec, snapshot_dir)
    caption_rows = write_captions(snapshot_dir, plan)
    write_caption_check(snapshot_dir, plan)
    manifest_root = record_captions(snapshot_dir, caption_rows)
    context.log.info(f"{len(caption_rows)} captions written; manifest root {manifest_root}")
    preview = [{"image": image, "caption": text, "source": plan.caption_sources.get(image, "")}
               for image, text in sorted(plan.captions.items())]
    tags = collections.Counter()
    for counts in plan.tag_frequency.values():
        tags.update(counts)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(manifest_root),
        metadata={
            "captions": len(caption_rows),
            "manifest_root": manifest_root,
            "caption_problems": len(plan.problems),
            "caption_changes_from_parent": dg.MetadataValue.md(parent_changes_markdown(root, spec.name, images=False)),
            "captions_table": table(preview, ["image", "caption", "source"]),
            "top_tags": table([{"tag": t, "count": c} for t, c in tags.most_common(30)], ["tag", "count"]),
        },
    )


@version_asset(
    kinds={"markdown"},
    deps=[caption_set],
    check_specs=REPORT_CHECKS,
    description="Validation before GPU time of the snapshot's images and caption files: report.json/report.md/"
    "contact_sheet.png in the snapshot, then seal.json (the version is whole; readers, verify and the training "
    "gate require it).",
)
@fails_on_user_error
def dataset_report(context: dg.AssetExecutionContext, data_root: DataRootResource) -> dg.MaterializeResult:
    root, spec, snapshot_dir = _version_inputs(context, data_root)
    captions = load_caption_check(snapshot_dir)  # the .txt files training reads, and caption_set's findings
    buckets = _training_buckets(context, root, spec.name)
    result = validate_dataset(root, spec, snapshot_dir, captions, buckets=buckets, thumbnails=MAX_IMAGES)
    files = write_report(snapshot_dir, result, captions, MAX_IMAGES)
    seal = seal_snapshot(snapshot_dir)  # the last write: from now on the version is whole
    update_index(root, spec.name)  # the lineage index learns the sealed version
    problems = list(result.problems)
    errors, warnings = errors_in(problems), warnings_in(problems)
    whose = f"; buckets of {', '.join(sorted(buckets))}" if buckets else ""  # else the defaults, as before
    context.log.info(f"report for {spec.name}: {len(errors)} errors, {len(warnings)} warnings{whose}")
    for observation in blocked_training(context.instance, root, spec.name) if errors else []:  # their pages say so
        context.log_event(observation)
    return dg.MaterializeResult(
        metadata={
            "report": dg.MetadataValue.md(files.markdown),
            "contact_sheet": image_markdown(files.contact_sheet, "contact sheet", photo=True),
            **problems_metadata(problems, COLUMNS, files.report_json),
            "errors": len(errors),
            "warnings": len(warnings),
            "counts": dg.MetadataValue.json(result.counts),
            "report_json": dg.MetadataValue.path(str(files.report_json)),
            "review_page": dg.MetadataValue.url(files.review_page.resolve().as_uri()),
            "sealed_files": seal["files"],
        },
        check_results=report_check_results(spec.name, errors, warnings, files.report_json),
    )
