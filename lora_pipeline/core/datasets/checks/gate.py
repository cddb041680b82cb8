"""The training gate: no GPU time for a dataset whose latest validation found blocking problems.

Dagster's blocking checks only stop downstream steps inside the same run; training launched in
a separate run (the CLI, the UI, a schedule) must ask for itself. The report is the record the
blocking check is computed from, so it is the thing to read — and it must describe the snapshot
as it is now (same manifest root), or it is stale. The version must be sealed (whole), and its report
and metadata files must still be the ones the seal recorded: an edited report.json is not believed. Every file
the manifest lists must be a regular file of the version itself: an image, or a whole `img/<n>_<name>` folder,
replaced by a link (even to an identical copy outside the data root) is refused, never trained through.
"""

from __future__ import annotations

from pathlib import Path

from lora_pipeline.core.datasets.checks.report import Report, read_report
from lora_pipeline.core.datasets.problems import errors_in
from lora_pipeline.core.datasets.snapshot.manifest import irregular_in, read_manifest, read_snapshot_info
from lora_pipeline.core.datasets.snapshot.seal import changed_sealed_files, require_sealed
from lora_pipeline.core.datasets.sources.regular_files import is_regular
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.names import closest_names
from lora_pipeline.core.paths import REPORT_JSON, SNAPSHOT, DataRoot


def require_passed_report(root: DataRoot, version: str) -> Report:
    """The report of a sealed version whose blocking checks passed; UserError (one line) otherwise."""
    snapshot_dir = root.dataset(version)
    if not (snapshot_dir / SNAPSHOT).is_file():
        if not root.spec_file(version).is_file():
            choices = root.spec_versions() + root.built_versions()
            raise UserError(f"dataset version '{version}' is not built and has no spec"
                            f"{closest_names(version, choices)}", root.spec_file(version))
        raise UserError(f"dataset version '{version}' is not built: run `lora-pipeline build {version}` first",
                        root.spec_file(version))
    seal = require_sealed(snapshot_dir)
    changed = changed_sealed_files(snapshot_dir, seal)
    if changed:
        raise UserError(
            f"{', '.join(changed)} changed since the version was sealed; refusing to train "
            f"(run `lora-pipeline verify {version}`)",
            snapshot_dir,
        )
    _require_own_files(snapshot_dir, version)
    report_path = snapshot_dir / REPORT_JSON
    report = read_report(snapshot_dir)
    snapshot = read_snapshot_info(snapshot_dir)
    if not snapshot.captions_complete:
        raise UserError(f"captions are not complete: run `lora-pipeline build {version}` first", snapshot_dir)
    if report.manifest_root != snapshot.manifest_root:
        raise UserError("validation report is stale (it describes another manifest): rebuild the report",
                        report_path)
    errors = errors_in(report.problems)
    if errors or not report.passed:
        first = errors[0] if errors else {"file": "", "code": "failed"}
        raise UserError(
            f"refusing to train: blocking checks failed for '{version}' ({len(errors)} error(s), "
            f"first: {first.get('file')} {first.get('code')}); fix the inputs and build a new version",
            report_path,
        )
    return report


def _require_own_files(snapshot_dir: Path, version: str) -> None:
    """UserError naming the first manifest file that is not a regular file of the version (lstat of every folder
    on the way down: no link is followed) or the first link, FIFO or empty folder in it."""
    rows = read_manifest(snapshot_dir)
    irregular = [snapshot_dir / rel for rel in irregular_in(snapshot_dir, read_snapshot_info(snapshot_dir),
                                                             (r.path for r in rows))]
    irregular += [snapshot_dir / r.path for r in rows if not is_regular(snapshot_dir / r.path, beneath=snapshot_dir)]
    if irregular:
        raise UserError(
            f"not a regular file of the version (a link, FIFO or device, or missing); refusing to train "
            f"(run `lora-pipeline verify {version}`)",
            min(irregular),
        )
