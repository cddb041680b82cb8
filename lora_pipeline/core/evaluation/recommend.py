"""The sweet-spot epoch: the practice of the style-training guide, made measurable and explained with numbers.

The guide compares epochs at several weights and prefers an epoch that works at full weight 1.0 over one
that only works at 0.8 and breaks at 1.0. Here:

1. Lowest-loss region: epochs whose validation loss is within VAL_LOSS_TOLERANCE (relative) of the minimum.
2. Holds at full weight: the mean absolute pixel distance (0..1) between the images just above and at 1.0,
   per unit of weight, divided by the same between 1.0 and just below it (1.2 vs 1.0 over 1.0 vs 0.8 for the
   default weights). Near 1 the images change smoothly through full weight; a ratio above BREAK_RATIO_LIMIT
   means they change much faster past 1.0 — the LoRA is over-fitted at full weight.
3. Over-fitting trend: validation loss rising while training loss falls over the last epochs.
4. Effect: each weight column's distance to the base-model column (zero would mean the LoRA does nothing).

Among the lowest-loss epochs that hold at full weight, the lowest validation loss wins (the later epoch on a
tie). Every signal is recorded with its numbers so a person can check the choice against the grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lora_pipeline.core.errors import UserError

VAL_LOSS_TOLERANCE = 0.02  # relative to the minimum validation loss
BREAK_RATIO_LIMIT = 1.5
TREND_WINDOW = 3  # epochs looked at for the over-fitting trend
NO_EFFECT = 1 / 255  # below one grey level on average, the LoRA has no visible effect
FULL_WEIGHT = 1.0


def fmt(value: float | None) -> str:
    """The one number format of the table, the reasons and the markdown, so numbers can be matched."""
    return "n/a" if value is None else f"{value:.6f}"


def weight_label(weight: float) -> str:
    """A LoRA weight as grid headers and JSON keys show it: 1.0, 0.6, 0.75."""
    text = f"{weight:.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def round6(value: float | None) -> float | None:
    """Six decimals; None for a value that is missing or not finite (a diverged loss is not a number to rank)."""
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def pixel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 image stacks, on a 0..1 scale."""
    return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))) / 255.0)


@dataclass(frozen=True)
class WeightProbe:
    """The weights the full-weight test compares: the full weight and its nearest neighbours."""

    below: float | None
    full: float | None
    above: float | None

    @classmethod
    def of(cls, weights: Sequence[float]) -> WeightProbe:
        full = FULL_WEIGHT if any(math.isclose(w, FULL_WEIGHT) for w in weights) else None
        below = max((w for w in weights if w < FULL_WEIGHT and not math.isclose(w, FULL_WEIGHT)), default=None)
        above = min((w for w in weights if w > FULL_WEIGHT and not math.isclose(w, FULL_WEIGHT)), default=None)
        return cls(below, full, above)

    @property
    def usable(self) -> bool:
        return None not in (self.below, self.full, self.above)


def image_signals(baseline: np.ndarray, images: np.ndarray, weights: Sequence[float]) -> dict[str, Any]:
    """Distances of one epoch's images: to the baseline per weight, and the full-weight break ratio.

    `baseline` is uint8 [prompt, H, W, 3]; `images` uint8 [weight, prompt, H, W, 3] in `weights` order.
    """
    by_weight = dict(zip(weights, images, strict=True))
    to_base = {weight_label(w): round6(pixel_distance(by_weight[w], baseline)) for w in weights}
    probe = WeightProbe.of(weights)
    ratio = step_above = step_below = None
    if probe.usable:
        step_above = pixel_distance(by_weight[probe.above], by_weight[probe.full]) / (probe.above - probe.full)
        step_below = pixel_distance(by_weight[probe.full], by_weight[probe.below]) / (probe.full - probe.below)
        ratio = step_above / step_below if step_below > 0 else None
    return {
        "distance_to_base": to_base,
        "change_per_weight_above_full": round6(step_above),
        "change_per_weight_below_full": round6(step_below),
        "break_ratio": round6(ratio),
    }


def _trend(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    window = list(rows[-TREND_WINDOW:])
    out: dict[str, Any] = {"window_epochs": [r["epoch"] for r in window], "flagged": False}
    if len(window) < 2 or any(r["train_loss"] is None or r["val_loss"] is None for r in window):
        out["note"] = "not enough epochs with both losses to judge a trend"
        return out
    val_delta = window[-1]["val_loss"] - window[0]["val_loss"]
    train_delta = window[-1]["train_loss"] - window[0]["train_loss"]
    out.update(val_loss_change=round6(val_delta), train_loss_change=round6(train_delta),
               flagged=val_delta > 0 and train_delta < 0)
    return out


def recommend(rows: Sequence[Mapping[str, Any]], weights: Sequence[float]) -> dict[str, Any]:
    """Pick the sweet-spot epoch from per-epoch rows and explain it.

    Each row: epoch, grid_row, train_loss and val_loss (None: unknown or not finite), and image_signals' keys;
    rows in epoch order.
    """
    scored = [r for r in rows if r["val_loss"] is not None]
    if not scored:
        raise UserError("no epoch has a finite validation loss: the training diverged; retrain with a lower "
                        "learning rate")
    probe = WeightProbe.of(weights)
    best_val = min(r["val_loss"] for r in scored)
    best_epoch = min(scored, key=lambda r: (r["val_loss"], -r["epoch"]))["epoch"]
    threshold = best_val * (1 + VAL_LOSS_TOLERANCE) if best_val >= 0 else best_val * (1 - VAL_LOSS_TOLERANCE)
    region = [r for r in scored if r["val_loss"] <= threshold]
    holding = [r for r in region if r["break_ratio"] is not None and r["break_ratio"] <= BREAK_RATIO_LIMIT]
    trend = _trend(rows)

    def loss_key(r: Mapping[str, Any]) -> tuple[float, int]:
        return r["val_loss"], -r["epoch"]

    reasons = [
        f"Lowest validation loss {fmt(best_val)} at epoch {best_epoch}; epochs within "
        f"{VAL_LOSS_TOLERANCE:.0%} of it (val loss <= {fmt(threshold)}): "
        + ", ".join(f"{r['epoch']} ({fmt(r['val_loss'])})" for r in region) + "."
    ]
    if holding:
        chosen = min(holding, key=loss_key)
        basis = "lowest validation loss among the lowest-loss epochs that hold up at full weight"
    elif not probe.usable:
        chosen = min(region, key=loss_key)
        basis = "lowest validation loss (eval_weights lack a weight below, at and above 1.0 to test full weight)"
    elif any(r["break_ratio"] is not None for r in region):
        chosen = min((r for r in region if r["break_ratio"] is not None), key=lambda r: (r["break_ratio"], -r["epoch"]))
        basis = ("no lowest-loss epoch holds up at full weight; this one breaks least — "
                 f"try it at weight {weight_label(probe.below)}, or retrain with fewer epochs or a lower learning rate")
    else:
        chosen = min(region, key=loss_key)
        basis = "lowest validation loss (the images did not change between the weights below and at 1.0)"
    if probe.usable:
        below, full, above = (weight_label(w) for w in (probe.below, probe.full, probe.above))
        reasons.append(
            f"Full-weight break ratio (change per weight {full}->{above} over {below}->{full}; above "
            f"{BREAK_RATIO_LIMIT:g} means it breaks past full weight): "
            + ", ".join(f"epoch {r['epoch']} {fmt(r['break_ratio'])}" for r in region) + "."
        )
    reasons.append(f"Chosen: epoch {chosen['epoch']} — {basis}.")
    effect = chosen["distance_to_base"]
    reasons.append(
        "Distance to the base-model images (0..1) by weight: "
        + ", ".join(f"{w}: {fmt(d)}" for w, d in effect.items()) + "."
    )
    full_key = weight_label(probe.full) if probe.full is not None else max(effect, key=float)
    warnings = [f"Epoch {r['epoch']}: the validation loss is not finite (diverged); it cannot be recommended."
                for r in rows if r["val_loss"] is None]
    if effect[full_key] < NO_EFFECT:
        warnings.append(f"At weight {full_key} the images differ from the base model by only {fmt(effect[full_key])} "
                        "(under one grey level): the LoRA has almost no visible effect.")
    if trend["flagged"]:
        a, b = trend["window_epochs"][0], trend["window_epochs"][-1]
        warnings.append(
            f"Over-fitting trend: from epoch {a} to {b} the validation loss rose by {fmt(trend['val_loss_change'])} "
            f"while the training loss fell by {fmt(-trend['train_loss_change'])}."
        )
    return {
        "recommended_epoch": chosen["epoch"],
        "grid_row": chosen["grid_row"],
        "basis": basis,
        "reasons": reasons,
        "warnings": warnings,
        "signals": {
            "lowest_loss_region": {
                "min_val_loss": round6(best_val), "min_epoch": best_epoch, "tolerance": VAL_LOSS_TOLERANCE,
                "threshold": round6(threshold), "epochs": [r["epoch"] for r in region],
            },
            "full_weight": {
                "below": probe.below, "full": probe.full, "above": probe.above,
                "break_ratio_limit": BREAK_RATIO_LIMIT, "holding_epochs": [r["epoch"] for r in holding],
            },
            "overfitting_trend": trend,
        },
    }
