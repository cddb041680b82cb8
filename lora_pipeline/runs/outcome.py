"""What a finished run's Dagster events say: its failed steps, blocked checks, materializations and outputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from lora_pipeline.core.errors import one_line
from lora_pipeline.defs.failures import USER_ERROR


@dataclass(frozen=True)
class StepFailure:
    """A failed step of a run."""

    step: str
    message: str  # the failure's description, or the first line of the innermost error
    metadata: dict[str, Any]  # a `dg.Failure`'s metadata as plain values; empty when the step crashed
    reported: bool  # the step raised `dg.Failure` itself (a result it reports), rather than crashing
    error_class: str = ""  # a crash's innermost exception class, e.g. "OSError"; "" for a reported failure

    @property
    def user_error(self) -> bool:
        return bool(self.metadata.get(USER_ERROR))


def _plain(metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {k: getattr(v, "value", v) for k, v in metadata.items()}


def step_failures(events: list[dg.DagsterEvent]) -> list[StepFailure]:
    failures = []
    for event in events:
        if not event.is_step_failure:
            continue
        data = event.step_failure_data
        reported = data.user_failure_data
        if reported is not None:
            failures.append(StepFailure(str(event.step_key), reported.description or "", _plain(reported.metadata),
                                        True))
            continue
        error = data.error
        while error is not None and error.cause is not None:
            error = error.cause
        message = one_line(error.message if error else "", empty="failed")
        failures.append(StepFailure(str(event.step_key), message, {}, False, error.cls_name if error else ""))
    return failures


def blocked_steps(events: list[dg.DagsterEvent]) -> set[str]:
    """Steps that failed because a blocking asset check they evaluated did not pass."""
    blocked = set()
    for event in events:
        if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            evaluation = event.asset_check_evaluation_data
            if evaluation.blocking and not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR:
                blocked.add(str(event.step_key))
    return blocked


@dataclass
class RunOutcome:
    run_id: str
    success: bool
    events: list[dg.DagsterEvent]  # the run's Dagster events, in order
    failures: list[StepFailure] = field(default_factory=list)  # blocked steps and expected reported failures

    def metadata(self, asset: str) -> dict:
        """The metadata of the asset's materialization in this run, as plain values."""
        for event in self.events:
            if event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
                mat = event.step_materialization_data.materialization
                if mat.asset_key == dg.AssetKey(asset):
                    return _plain(mat.metadata)
        return {}

    def output_metadata(self, step: str) -> dict:
        """The metadata of a step's output in this run, as plain values."""
        for event in self.events:
            if event.is_successful_output and event.step_key == step:
                return _plain(event.step_output_data.metadata)
        return {}

    def failure(self, step: str) -> StepFailure | None:
        return next((f for f in self.failures if f.step == step), None)

    def check_passed(self, check_name: str) -> bool | None:
        for event in self.events:
            if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
                evaluation = event.asset_check_evaluation_data
                if evaluation.check_name == check_name:
                    return evaluation.passed
        return None


def run_failure_reason(events: list[dg.DagsterEvent]) -> str:
    """The last error the run itself (not a step) reported, on one line: e.g. a Celery worker lost while it ran a
    step ("... [dataset_snapshot]: ...WorkerLostError: Worker exited prematurely: signal 9 (SIGKILL) ...")."""
    found = ""
    for event in events:
        error = None
        if event.event_type == dg.DagsterEventType.RUN_FAILURE:
            error = event.job_failure_data.error
        elif event.event_type == dg.DagsterEventType.ENGINE_EVENT and event.engine_event_data is not None:
            error = event.engine_event_data.error
        if error is not None and error.message.strip():
            found = " ".join(line.strip() for line in error.message.strip().splitlines() if line.strip())
    return found
