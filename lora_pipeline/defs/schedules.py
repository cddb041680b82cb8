"""Nightly re-verification of every snapshot against its manifest."""


import dagster as dg

from lora_pipeline.core.datasets.seal import verify_version
from lora_pipeline.defs.resources import DataRootResource


@dg.op(description="Re-hash every sealed snapshot; fail naming each flipped, missing or extra file.")
def verify_all_snapshots(context: dg.OpExecutionContext, data_root: DataRootResource) -> None:
    root = data_root.data
    versions = root.built_versions()
    findings = []
    for version in versions:
        result = verify_version(root.dataset(version))
        if not result.sealed:  # being built now, or an interrupted build: its files are not final
            context.log.warning(result.problems()[0])
            continue
        context.log.info(f"{version}: {result.files_checked} files checked, {'ok' if result.ok else 'MISMATCH'}")
        findings += result.problems()
    if findings:
        raise dg.Failure(
            description=f"{len(findings)} snapshot file(s) no longer match their manifest",
            metadata={"findings": dg.MetadataValue.md("\n".join(f"- {f}" for f in findings))},
        )


@dg.job(description="Re-verify all dataset snapshots against their manifests.")
def verify_snapshots_job() -> None:
    verify_all_snapshots()


nightly_verify_schedule = dg.ScheduleDefinition(
    name="nightly_verify_schedule",
    job=verify_snapshots_job,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
