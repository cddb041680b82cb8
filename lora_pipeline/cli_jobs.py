"""The commands of the command line that run a Dagster job through the instance, so the UI sees every run:
`intake`, `build`, `train`, `evaluate`, `verify`, `captions import` and `demo` (the whole chain on the sample data).
Each registers the partitions it needs first, and checks the spec or recipe it names with a one-line UserError.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from lora_pipeline.cli_records import CommandResult
from lora_pipeline.core.errors import UserError, printable
from lora_pipeline.core.paths import DataRoot


def _require_file(path: Path, what: str, name: str, choices: list[str]) -> None:
    """A one-line UserError when the spec or recipe file of `name` is missing, naming the closest names."""
    from lora_pipeline.core.names import closest_names

    if not path.is_file():
        raise UserError(f"{what} '{name}' not found{closest_names(name, choices)}", path)


def _require_spec(root: DataRoot, version: str) -> None:
    _require_file(root.spec_file(version), "dataset version", version, root.spec_versions())


def _require_recipe(root: DataRoot, recipe: str) -> None:
    _require_file(root.recipe_file(recipe), "recipe", recipe, root.recipe_names())


def _register(version_or_batches: dict[str, list[str]]) -> None:
    from lora_pipeline.defs import partitions
    from lora_pipeline.runs.instance import instance

    inst = instance()
    for name, keys in version_or_batches.items():
        partitions.register(inst, getattr(partitions, name), keys)


def cmd_intake(args: argparse.Namespace, root: DataRoot) -> CommandResult:
    from lora_pipeline.core.datasets.sources.batches import intake
    from lora_pipeline.core.datasets.sources.rights import batch_rights, intake_rights, record_rights
    from lora_pipeline.runs.instance import instance
    from lora_pipeline.runs.jobs import run_job

    declared, digest = intake_rights(Path(args.src_dir), args.rights, args.licence, args.holder)
    result = intake(Path(args.src_dir), root, args.batch)
    if declared is not None:
        record_rights(root, args.batch, declared, "intake", file_sha256=digest)
    _register({"source_batches": [args.batch]})
    outcome = run_job("register_batch_job", args.batch, instance(), args.json)
    meta = outcome.metadata("source_batch")
    return CommandResult({
        "batch": args.batch,
        "path": str(root.batch(args.batch)),
        "files": meta.get("files"),
        "bytes": meta.get("bytes"),
        "batch_fingerprint": meta.get("batch_fingerprint"),
        "skipped": [n for n in getattr(result, "skipped", [])],
        "rights": batch_rights(root, args.batch).to_json_dict(),
        "dagster_run_id": outcome.run_id,
    })


def _fingerprint_batches(root: DataRoot, spec: Any, quiet: bool) -> None:
    """Materialize `source_batch` for each ready batch the spec takes that has no materialization yet, as
    `source_batch_sensor` does under `make ui`: the UI then shows the dataset's upstream, not "Missing"."""
    import fnmatch

    import dagster as dg

    from lora_pipeline.core.datasets.sources.retired import retired_batches
    from lora_pipeline.runs.instance import instance
    from lora_pipeline.runs.jobs import run_job

    inst = instance()
    done = inst.get_materialized_partitions(dg.AssetKey("source_batch"))
    patterns = [s.batch for s in spec.sources if s.batch]
    retired = retired_batches(root)  # a glob skips them; a spec naming one fails in the build with its one line
    for batch in root.ready_batches():
        if batch not in done and batch not in retired and any(fnmatch.fnmatchcase(batch, p) for p in patterns):
            run_job("register_batch_job", batch, inst, quiet)


def build_version(root: DataRoot, version: str, quiet: bool) -> dict[str, Any]:
    """Snapshot + captions + report for one version; UserError if a blocking check fails."""
    from lora_pipeline.core.datasets.checks.inspection import discard_early
    from lora_pipeline.core.datasets.checks.report import read_report
    from lora_pipeline.core.datasets.problems import errors_in, warnings_in
    from lora_pipeline.core.datasets.snapshot.manifest import read_snapshot_info
    from lora_pipeline.core.datasets.spec import load_spec
    from lora_pipeline.core.paths import CONTACT_SHEET, REPORT_MD
    from lora_pipeline.defs.datasets import EARLY_INSPECTION_TAG, NO_ERRORS_CHECK
    from lora_pipeline.runs.instance import instance
    from lora_pipeline.runs.jobs import run_job

    _require_spec(root, version)
    spec = load_spec(root.spec_file(version))  # a bad spec fails here with its one line
    _register({"source_batches": root.ready_batches(), "dataset_versions": [version]})
    _fingerprint_batches(root, spec, quiet)
    try:  # the run executes here, in this process: its images are decoded while its captions are written
        outcome = run_job("build_dataset_job", version, instance(), quiet, tags={EARLY_INSPECTION_TAG: "1"})
    finally:
        discard_early()  # a run that failed before its validation leaves no decode running
    snapshot_dir = root.dataset(version)
    report = read_report(snapshot_dir)
    errors = errors_in(report.problems)
    summary = {
        "version": version,
        "dataset": str(snapshot_dir),
        "manifest_root": read_snapshot_info(snapshot_dir).manifest_root,
        "counts": report.counts,
        "errors": len(errors),
        "warnings": len(warnings_in(report.problems)),
        "report": str(snapshot_dir / REPORT_MD),
        "contact_sheet": str(snapshot_dir / CONTACT_SHEET),
        "dagster_run_id": outcome.run_id,
    }
    if outcome.check_passed(NO_ERRORS_CHECK) is False:
        first = errors[0] if errors else {"file": "", "message": "see report.md"}
        raise UserError(
            f"{len(errors)} blocking problem(s), first: {first['file']}: {first['message']} "
            f"(report: {snapshot_dir / REPORT_MD})",
            root.spec_file(version),
        )
    return summary


def cmd_build(args: argparse.Namespace, root: DataRoot) -> CommandResult:
    return CommandResult(build_version(root, args.version, args.json))


def train_version(root: DataRoot, version: str, recipe: str, quiet: bool) -> dict[str, Any]:
    from lora_pipeline.core.datasets.checks.gate import require_passed_report
    from lora_pipeline.core.training.recipe import load_recipe
    from lora_pipeline.defs.partitions import training_key
    from lora_pipeline.runs.instance import instance
    from lora_pipeline.runs.jobs import run_job

    _require_recipe(root, recipe)
    load_recipe(root.recipe_file(recipe))
    require_passed_report(root, version)
    _register({"dataset_versions": [version], "training_runs": [training_key(version, recipe)]})
    outcome = run_job("train_job", training_key(version, recipe), instance(), quiet)
    meta = outcome.metadata("lora_epochs")
    files = sorted(str(p) for p in root.loras(version, recipe).glob("*.safetensors"))
    return {
        "version": version,
        "recipe": recipe,
        "epoch_files": files,
        "mlflow_run_id": meta.get("mlflow_run_id"),
        "mlflow_tracking_uri": meta.get("mlflow_tracking_uri"),
        "images_trained": meta.get("images_trained"),
        "fast_path": meta.get("fast_path"),
        "timings": {k.removeprefix("seconds_"): v for k, v in meta.items() if k.startswith("seconds_")},
        "dagster_run_id": outcome.run_id,
    }


def cmd_train(args: argparse.Namespace, root: DataRoot) -> CommandResult:
    return CommandResult(train_version(root, args.version, args.recipe, args.json))


def evaluate_version(root: DataRoot, version: str, recipe: str, quiet: bool) -> dict[str, Any]:
    from lora_pipeline.core.fileio import read_json
    from lora_pipeline.core.training.recipe import load_recipe
    from lora_pipeline.defs.partitions import training_key
    from lora_pipeline.runs.instance import instance
    from lora_pipeline.runs.jobs import run_job

    _require_recipe(root, recipe)
    load_recipe(root.recipe_file(recipe))
    if not any(root.loras(version, recipe).glob("*.safetensors")):
        raise UserError(f"no trained epochs: run `lora-pipeline train {version} --recipe {recipe}` first",
                        root.loras(version, recipe))
    _register({"dataset_versions": [version], "training_runs": [training_key(version, recipe)]})
    outcome = run_job("evaluate_job", training_key(version, recipe), instance(), quiet)
    out = root.evals(version, recipe)
    return {
        "version": version,
        "recipe": recipe,
        "grids": sorted(str(p) for p in out.glob("grid*.png")),
        "val_loss_png": str(out / "val_loss.png"),
        "recommendation": read_json(out / "recommendation.json"),
        "timings": {k.removeprefix("seconds_"): v for k, v in outcome.metadata("evaluation_grid").items()
                    if k.startswith("seconds_")},
        "dagster_run_id": outcome.run_id,
    }


def cmd_evaluate(args: argparse.Namespace, root: DataRoot) -> CommandResult:
    return CommandResult(evaluate_version(root, args.version, args.recipe, args.json))


def cmd_verify(args: argparse.Namespace, root: DataRoot) -> CommandResult:
    """Runs `verify_snapshots_job`, the job of the nightly schedule, for one version or all. A version that is
    not sealed is not checked (a build may be writing it) and fails the run, listed under `unsealed`."""
    from lora_pipeline.defs.schedules import VERIFY_STEP
    from lora_pipeline.runs.instance import instance
    from lora_pipeline.runs.jobs import run_job

    versions = [args.version] if args.version else []
    outcome = run_job("verify_snapshots_job", None, instance(), args.json,
                      op_config={VERIFY_STEP: {"config": {"versions": versions}}}, reports_by_failing={VERIFY_STEP})
    failure = outcome.failure(VERIFY_STEP)
    summary = failure.metadata if failure else outcome.output_metadata(VERIFY_STEP)
    data = {"versions": summary["versions"], "findings": summary["findings"], "unsealed": summary["unsealed"],
            "ok": failure is None, "dagster_run_id": outcome.run_id}
    text = None
    if not summary["versions"]:  # "ok" would claim a check that did not happen
        text = f"nothing to verify: no dataset version is built under {root.datasets}"
    return CommandResult(data, text=text, exit_code=1 if failure else 0)


def cmd_captions_import(args: argparse.Namespace, root: DataRoot) -> CommandResult:
    """Lands the edited captions as a new caption batch, registered as intake registers a batch, and writes the
    spec of the new version that layers it."""
    from lora_pipeline.core.datasets.captions.review_io import import_captions
    from lora_pipeline.runs.instance import instance
    from lora_pipeline.runs.jobs import run_job

    result = import_captions(root, Path(args.csv), args.batch)
    _register({"source_batches": [result.batch]})
    outcome = run_job("register_batch_job", result.batch, instance(), args.json)
    return CommandResult({
        "batch": result.batch, "path": str(result.dir), "captions_of": result.version, "edited": len(result.edited),
        "new_version": result.new_version, "spec": str(result.spec),
        "next": f"lora-pipeline build {result.new_version}", "dagster_run_id": outcome.run_id,
    })


def demo_mlflow_line(run_id: str, tracking_uri: str) -> str:
    """The demo's MLflow line: `make mlflow-ui` serves the data root's own SQLite store, so it is named only for
    that store, never for a server's (the cluster profile's, which `make cluster-demo` stops when it ends)."""
    return f"  mlflow      run {run_id} in {tracking_uri}" + (
        " (make mlflow-ui)" if tracking_uri.startswith("sqlite:") else "")


def cmd_demo(args: argparse.Namespace, root: DataRoot) -> CommandResult:
    from lora_pipeline.core.lineage.provenance import trace_lora

    started = time.monotonic()
    timings: dict[str, float] = {}
    built = {}
    for version in DEMO_VERSIONS:
        t = time.monotonic()
        built[version] = build_version(root, version, args.json)
        timings[f"build {version}"] = round(time.monotonic() - t, 1)
        _say(args, f"built {version}: {built[version]['dataset']}")
    t = time.monotonic()
    trained = train_version(root, DEMO_TRAIN_VERSION, DEMO_RECIPE, args.json)
    timings["train"] = round(time.monotonic() - t, 1)
    _say(args, f"trained {len(trained['epoch_files'])} epochs: {Path(trained['epoch_files'][-1]).parent}")
    t = time.monotonic()
    evaluated = evaluate_version(root, DEMO_TRAIN_VERSION, DEMO_RECIPE, args.json)
    timings["evaluate"] = round(time.monotonic() - t, 1)
    rec = evaluated["recommendation"]
    chosen = next(f for f in trained["epoch_files"] if f.endswith(f"-e{rec['recommended_epoch']:03d}.safetensors"))
    chain = trace_lora(root, Path(chosen))
    timings["total"] = round(time.monotonic() - started, 1)
    reasons = rec.get("reasons") or []
    text = "\n".join([
        "",
        "lora-pipeline demo: done",
        *(f"  dataset     {v}: {b['dataset']} (report {b['report']})" for v, b in built.items()),
        f"  epochs      {len(trained['epoch_files'])} files in {Path(trained['epoch_files'][-1]).parent}",
        demo_mlflow_line(trained["mlflow_run_id"], trained["mlflow_tracking_uri"]),
        *(f"  grid        {g}" for g in evaluated["grids"]),
        f"  val loss    {evaluated['val_loss_png']}",
        f"  recommended epoch {rec['recommended_epoch']}: {chosen}",
        *(f"              - {r}" for r in reasons[:3]),
        f"  provenance  {chain.status} ({len(chain.images)} images traced): "
        f"lora-pipeline provenance {chosen}",
        "  seconds     " + ", ".join(f"{k} {v}" for k, v in timings.items()),
    ])
    return CommandResult({
        "datasets": {v: b["dataset"] for v, b in built.items()},
        "reports": {v: b["report"] for v, b in built.items()},
        "epoch_files": trained["epoch_files"],
        "mlflow_run_id": trained["mlflow_run_id"],
        "mlflow_tracking_uri": trained["mlflow_tracking_uri"],
        "grids": evaluated["grids"],
        "val_loss_png": evaluated["val_loss_png"],
        "recommendation": rec,
        "provenance_status": chain.status,
        "provenance_images": len(chain.images),
        "seconds": timings,
    }, text=text)


DEMO_VERSIONS = ["hardware-design-aesthetic-v1", "hardware-design-aesthetic-v2", "hardware-promoted-merge-v1",
                 "hardware-masked-reg-v1"]
DEMO_TRAIN_VERSION = "hardware-design-aesthetic-v2"
DEMO_RECIPE = "demo-tiny"


def _say(args: argparse.Namespace, line: str) -> None:
    if not args.json:
        print(printable(line), flush=True)
