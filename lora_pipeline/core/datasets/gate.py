"""The training gate: no GPU time for a dataset whose latest validation found blocking problems.

Dagster's blocking checks only stop downstream steps inside the same run; training launched in
a separate run (the CLI, the UI, a schedule) must ask for itself. The report is the record the
blocking check is computed from, so it is the thing to read — and it must describe the snapshot
as it is now (same manifest root), or it is stale.
"""

from __future__ import annotations

from typing import Any

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import read_json
from lora_pipeline.core.paths import DataRoot


def require_passed_report(root: DataRoot, version: str) -> dict[str, Any]:
    snapshot_dir = root.dataset(version)
    if not (snapshot_dir / "snapshot.json").is_file():
        raise UserError(f"dataset version '{version}' is not built: run `lora-pipeline build {version}` first",
                        root.spec_file(version))
    report_path = snapshot_dir / "report.json"
    if not report_path.is_file():
        raise UserError(f"no validation report: run `lora-pipeline build {version}` first", report_path)
    report = read_json(report_path)
    snapshot = read_json(snapshot_dir / "snapshot.json")
    if not snapshot.get("captions_complete"):
        raise UserError(f"captions are not complete: run `lora-pipeline build {version}` first", snapshot_dir)
    if report.get("manifest_root") != snapshot.get("manifest_root"):
        raise UserError("validation report is stale (it describes another manifest): rebuild the report",
                        report_path)
    errors = [p for p in report.get("problems", []) if p.get("severity") == "error"]
    if errors or not report.get("passed", False):
        first = errors[0] if errors else {"file": "", "code": "failed"}
        raise UserError(
            f"refusing to train: blocking checks failed for '{version}' ({len(errors)} error(s), "
            f"first: {first.get('file')} {first.get('code')}); fix the inputs and build a new version",
            report_path,
        )
    return report
