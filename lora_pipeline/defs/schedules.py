"""Re-verification of snapshots against their manifests: the job `lora-pipeline verify` runs, and nightly."""


import dagster as dg

from lora_pipeline.core.datasets.snapshot.seal import verify_versions
from lora_pipeline.core.lineage.lineage_index import index_findings
from lora_pipeline.defs.failures import fails_on_user_error
from lora_pipeline.defs.resources import DataRootResource

VERIFY_STEP = "verify_snapshots"


class VerifyConfig(dg.Config):
    versions: list[str] = []  # empty: every built dataset version


@dg.op(
    name=VERIFY_STEP,
    out=dg.Out(dg.Nothing),
    description="Re-hash sealed snapshots; fail naming each flipped, missing, extra or irregular (link, FIFO, empty "
    "folder) entry. A version that is not sealed is not checked and fails the run (listed under `unsealed`): a "
    "removed seal must not pass. The summary is the output's metadata (or the failure's): `versions`, `findings`, "
    "`unsealed`.",
)
@fails_on_user_error
def verify_snapshots(context: dg.OpExecutionContext, config: VerifyConfig, data_root: DataRootResource):
    results = verify_versions(data_root.data, config.versions)
    findings, unsealed = [], []
    for result in results:
        if not result.sealed:  # being built now, or an interrupted build: its files are not final
            context.log.warning(result.problems()[0])
            unsealed += result.problems()
            continue
        context.log.info(f"{result.version}: {result.files_checked} files checked, {'ok' if result.ok else 'MISMATCH'}")
        findings += result.problems()
    findings += index_findings(data_root.data, config.versions)  # the lineage index, derived from the versions
    versions = {r.version: {"ok": r.ok, "sealed": r.sealed, "files_checked": r.files_checked} for r in results}
    summary = {
        "versions": dg.MetadataValue.json(versions),
        "findings": dg.MetadataValue.json(findings),
        "unsealed": dg.MetadataValue.json(unsealed),
        "findings_md": dg.MetadataValue.md("\n".join(f"- {f}" for f in findings + unsealed) or "none"),
    }
    if findings:
        raise dg.Failure(description=f"{len(findings)} finding(s): snapshot files that no longer match their manifest "
                         "or a lineage index that no longer matches the versions",
                         metadata=summary)
    if unsealed:
        named = "named " if config.versions else ""
        raise dg.Failure(description=f"{len(unsealed)} {named}version(s) not sealed yet", metadata=summary)
    return dg.Output(None, metadata=summary)


@dg.job(description="Re-verify dataset snapshots (all, or the configured versions) against their manifests.")
def verify_snapshots_job() -> None:
    verify_snapshots()


nightly_verify_schedule = dg.ScheduleDefinition(
    name="nightly_verify_schedule",
    job=verify_snapshots_job,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
