"""The text `lora-pipeline lineage` prints: a few lines per version and per training, for a person to read
(`--json` prints lineage_query.py's data as it is)."""

from __future__ import annotations

from typing import Any

from lora_pipeline.core.datasets.sources.retired import RetirementRecord
from lora_pipeline.core.paths import REPORT_MD


def _retired(item: dict[str, Any]) -> str:
    """`; built on RETIRED batch(es) X, Y` for a version, training or LoRA built on a retired batch."""
    batches = item.get("retired_batches") or []
    return f"; built on RETIRED batch(es) {', '.join(batches)}" if batches else ""


def _retired_lines(data: dict[str, Any]) -> list[str]:
    """One line per retired batch the answer involves: who retired it, when and why."""
    return [
        f"RETIRED batch {b}: {RetirementRecord.model_validate(r).line}" for b, r in data.get("retired", {}).items()
    ]


def _status(info: dict[str, Any]) -> str:
    if info.get("missing"):
        return "not in the index"
    if info["passed"]:
        return "passed its blocking checks"
    first = f"; first: {info['first_error']}" if info["first_error"] else ""
    return f"BLOCKED: {info['errors']} blocking error(s){first} (report: datasets/{info['version']}/{REPORT_MD})"


def _how(item: dict[str, Any]) -> str:
    ways = ["direct"] if item["direct"] else []
    kind = "merge of" if item["merge"] else "through"
    ways += [f"{kind} {parent}" for parent in item["through"]]
    return " and ".join(ways) or "?"


def _epochs(epochs: list[int]) -> str:
    if not epochs:
        return "no epoch files"
    if epochs == list(range(epochs[0], epochs[-1] + 1)) and len(epochs) > 2:
        return f"epochs {epochs[0]}-{epochs[-1]}"
    return "epoch" + ("s " if len(epochs) > 1 else " ") + ", ".join(map(str, epochs))


def _trainings(trainings: list[dict[str, Any]]) -> list[str]:
    if not trainings:
        return ["trainings: none"]
    lines = [f"trainings: {len(trainings)}"]
    for t in trainings:
        runs = ", ".join(t["mlflow_run_ids"]) or "none"
        lines.append(
            f"  {t['version']} x {t['recipe']}: {_epochs(t['epochs'])} ({len(t['files'])} files), MLflow run {runs}"
            f"{_retired(t)}"
        )
        if t.get("recommended_epoch") is not None:
            lines.append(f"    recommended epoch {t['recommended_epoch']}: {t['recommended_file']}")
        else:
            lines.append("    not evaluated (no recommendation)")
    return lines


def _upstream(data: dict[str, Any]) -> list[str]:
    lines = ["up: batches"]
    for b in data["batches"]:
        ways = [f"{b['direct']} file(s) directly"] if b["direct"] else []
        ways += [f"{b['inherited']} file(s) through parent versions"] if b["inherited"] else []
        retired = " RETIRED" if b.get("retired") else ""
        lines.append(f"  {b['batch']}{retired}: {' + '.join(ways)} ({b['images']} image(s))")
    if data["ancestors"]:
        lines.append("up: parent versions")
        lines += [
            f"  {a['version']}{' (merge)' if a.get('merge') else ''}: {_status(a)}{_retired(a)}"
            for a in data["ancestors"]
        ]
    return lines


def _version_line(info: dict[str, Any]) -> str:
    parents = f", parents {', '.join(info['parents'])}" if info["parents"] else ""
    merge = " (a merge)" if info["merge"] else ""
    return f"version {info['version']}{merge}: {info['images']} images{parents}; {_status(info)}{_retired(info)}"


def format_lineage(data: dict[str, Any]) -> str:
    """The text of one answer of query.lineage; the retired batches it involves first."""
    lines = _retired_lines(data)
    if "batch" in data:
        lines.append(f"batch {data['batch']}: taken by {len(data['versions'])} dataset version(s)")
    elif "file" in data:
        what = data["file"]
        name = f"{what['batch']}/{what['path']}" if "batch" in what else f"sha256 {what['sha256']}"
        lines.append(f"file {name}: in {len(data['versions'])} dataset version(s)")
    if "versions" in data:
        for v in data["versions"]:
            where = f" as {v['path']}" if "path" in v else f", {v['files']} file(s), {v['images']} image(s)"
            lines.append(f"  {v['version']}: {_how(v)}{where}; {_status(v)}{_retired(v)}")
        return "\n".join(lines + _trainings(data["trainings"]))
    if "lora" in data:
        lora = data["lora"]
        chosen = lora["recommended_epoch"]
        rec = (
            "not evaluated"
            if chosen is None
            else ("the recommended epoch" if chosen == lora["epoch"] else f"recommended epoch is {chosen}")
        )
        lines += [
            f"LoRA {lora['file']}: epoch {lora['epoch']} (step {lora['steps']}) of {lora['version']} x "
            f"{lora['recipe']}; {rec}{_retired(lora)}",
            f"  MLflow run {lora['mlflow_run_id']}, manifest root {lora['manifest_root']}",
        ]
    lines.append(_version_line(data["version"]))
    lines += _upstream(data)
    if "descendants" in data:
        lines.append("down: versions built from it" + ("" if data["descendants"] else ": none"))
        lines += [f"  {_version_line(d).removeprefix('version ')}" for d in data["descendants"]]
        lines += _trainings(data["trainings"])
    return "\n".join(lines)
