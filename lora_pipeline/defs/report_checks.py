"""`dataset_report`'s checks, one result per dataset version, and what a failed blocking check tells training.

The checks are partitioned like the asset (Dagster's preview `AssetCheckSpec.partitions_def`), so the UI shows
each result under its version instead of "Partition -", and one failed version does not stand for all of them;
the version is also in each result's description and metadata. A version whose blocking check failed leaves an
observation on each of its training partitions (defs/lineage_pages.py): their `lora_epochs` pages say they are
blocked and link the report, instead of "No metadata entries".
"""

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from lora_pipeline.core.datasets.checks.gate import require_passed_report
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.defs.lineage_pages import blocked_observation
from lora_pipeline.defs.metadata import problems_metadata
from lora_pipeline.defs.partitions import dataset_versions, training_key, training_runs

NO_ERRORS_CHECK = "no_blocking_problems"
NO_WARNINGS_CHECK = "no_warnings"
COLUMNS = ["severity", "code", "file", "scope", "message"]


def _spec(name: str, blocking: bool, description: str) -> dg.AssetCheckSpec:
    with warnings.catch_warnings():  # a preview API, used knowingly: a check result per version
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.AssetCheckSpec(
            name, asset="dataset_report", blocking=blocking, description=description, partitions_def=dataset_versions
        )


REPORT_CHECKS = [
    _spec(NO_ERRORS_CHECK, True, "No error in report.json: blocks training on a bad dataset version."),
    _spec(NO_WARNINGS_CHECK, False, "Warnings in report.json, for a human to look at."),
]


def report_check_results(
    version: str, errors: Sequence[dict[str, Any]], warnings_: Sequence[dict[str, Any]], report_json: Path
) -> list[dg.AssetCheckResult]:
    """The two checks' results for one version, each naming the version."""

    def result(name: str, found: Sequence[dict[str, Any]], what: str, severity: dg.AssetCheckSeverity):
        return dg.AssetCheckResult(
            check_name=name,
            passed=not found,
            severity=severity,
            description=f"{version}: {len(found)} {what}" + (f" (see {report_json})" if found else ""),
            metadata={"dataset_version": version, what: len(found), **problems_metadata(found, COLUMNS, report_json)},
        )

    return [
        result(NO_ERRORS_CHECK, errors, "errors", dg.AssetCheckSeverity.ERROR),
        result(NO_WARNINGS_CHECK, warnings_, "warnings", dg.AssetCheckSeverity.WARN),
    ]


def blocked_training(instance: dg.DagsterInstance, root: DataRoot, version: str) -> list[dg.AssetObservation]:
    """An observation for each training partition of the version, when the training gate refuses the version
    (its line is the reason); none when the version may be trained."""
    try:
        require_passed_report(root, version)
    except UserError as exc:
        reason = str(exc)
    else:
        return []
    prefix = training_key(version, "")
    return [
        blocked_observation(root, version, key.removeprefix(prefix), reason)
        for key in instance.get_dynamic_partitions(training_runs.name)
        if key.startswith(prefix)
    ]
