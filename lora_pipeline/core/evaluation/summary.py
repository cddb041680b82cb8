"""`recommendation.md`: the recommendation, its reasons and the per-epoch numbers, for people and Dagster."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lora_pipeline.core.evaluation.recommend import fmt, weight_label


def _epoch_table(report: Mapping[str, Any]) -> list[str]:
    weights = [weight_label(w) for w in report["weights"][1:]]
    head = ["epoch", "grid row", "steps", "train loss", "val loss", "break ratio",
            *(f"to base @{w}" for w in weights)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    chosen = report["recommended_epoch"]
    for row in report["epochs"]:
        epoch = f"**{row['epoch']}** (recommended)" if row["epoch"] == chosen else str(row["epoch"])
        cells = [epoch, str(row["grid_row"]), str(row["steps"]), fmt(row["train_loss"]), fmt(row["val_loss"]),
                 fmt(row["break_ratio"]), *(fmt(row["distance_to_base"][w]) for w in weights)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown; every number is formatted as in recommendation.json's reasons."""
    epoch, row = report["recommended_epoch"], report["grid_row"]
    grids = ", ".join(f"`{g}`" for g in report["grids"])
    validation = report["validation"]
    lines = [
        f"# {report['version']} / {report['recipe']}: recommended epoch {epoch}",
        "",
        f"**File:** `{report['recommended_file']}`  ",
        f"**Grid:** row {row} (framed in red, labelled \"recommended\") of {grids}  ",
        f"**Basis:** {report['basis']}",
        "",
        "## Why",
        *(f"- {reason}" for reason in report["reasons"]),
    ]
    if report["warnings"]:
        lines += ["", "## Warnings", *(f"- {warning}" for warning in report["warnings"])]
    lines += [
        "",
        "## Per-epoch metrics",
        "Break ratio: how fast the images change just above full weight relative to just below it "
        "(near 1 is smooth; a jump means the LoRA breaks at full weight). \"to base\": mean absolute pixel "
        "distance (0..1) to the base model's image at the same seed.",
        "",
        *_epoch_table(report),
        "",
        "## Inputs",
        f"- Validation: {validation['note']}; {len(validation['images'])} image(s) × "
        f"{validation['noise_draws_per_image']} fixed noise draws (seed {validation['seed']}).",
        f"- Training loss: {report['train_loss_source']}.",
        f"- Sampling: seed {report['sampling']['seed']} + prompt index, {report['sampling']['steps']} steps, "
        f"guidance {report['sampling']['guidance_scale']:g}, {report['sampling']['resolution']} px, "
        f"{report['sampling']['device']} {report['sampling']['dtype']}.",
        f"- Evaluated epochs {', '.join(str(r['epoch']) for r in report['epochs'])} of saved "
        f"{', '.join(str(e) for e in report['saved_epochs'])}.",
        "",
    ]
    return "\n".join(lines)
