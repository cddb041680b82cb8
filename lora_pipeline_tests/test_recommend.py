"""The sweet-spot rule on hand-made numbers: region of lowest loss, full-weight break ratio, trend, effect."""

from __future__ import annotations

import numpy as np
import pytest

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.evaluation.evaluate import select_epochs
from lora_pipeline.core.evaluation.recommend import fmt, image_signals, recommend, round6, weight_label

WEIGHTS = (0.6, 0.8, 1.0, 1.2)


def row(epoch: int, val: float, ratio: float | None, train: float | None = 1.0, effect: float = 0.05) -> dict:
    return {"epoch": epoch, "grid_row": epoch, "val_loss": val, "train_loss": train, "break_ratio": ratio,
            "distance_to_base": {weight_label(w): effect * w for w in WEIGHTS}}


@pytest.mark.parametrize(("epochs", "limit", "expected"), [
    (range(1, 21), 5, [4, 8, 12, 16, 20]),
    (range(1, 5), 0, [1, 2, 3, 4]),
    (range(1, 4), 5, [1, 2, 3]),
    (range(1, 11), 1, [10]),
    (range(1, 11), 3, [4, 7, 10]),
    ([2, 4, 6, 8], 2, [4, 8]),
])
def test_select_epochs_spreads_evenly_and_keeps_the_last(epochs, limit, expected):
    assert select_epochs(list(epochs), limit) == expected


def test_image_signals_measure_distance_to_base_and_the_full_weight_break_ratio():
    base = np.zeros((2, 4, 4, 3), np.uint8)
    # images at 0.6, 0.8, 1.0, 1.2: grey levels 10, 20, 30, 70 -> change 1.0->1.2 is 4x the change 0.8->1.0
    images = np.stack([np.full((2, 4, 4, 3), level, np.uint8) for level in (10, 20, 30, 70)])
    signals = image_signals(base, images, WEIGHTS)
    assert signals["distance_to_base"] == {"0.6": round(10 / 255, 6), "0.8": round(20 / 255, 6),
                                           "1.0": round(30 / 255, 6), "1.2": round(70 / 255, 6)}
    assert signals["break_ratio"] == pytest.approx(4.0, abs=1e-5)
    assert image_signals(base, images[:3], WEIGHTS[:3])["break_ratio"] is None  # nothing above 1.0


def test_prefers_the_lowest_loss_epoch_that_holds_at_full_weight():
    rows = [row(1, 0.200, 1.0), row(2, 0.150, 2.4), row(3, 0.152, 1.1), row(4, 0.170, 1.0)]
    decision = recommend(rows, WEIGHTS)
    # epoch 2 has the lowest loss but breaks at full weight; epoch 3 is within 2 % and holds
    assert decision["recommended_epoch"] == 3 and decision["grid_row"] == 3
    region = decision["signals"]["lowest_loss_region"]
    assert region["epochs"] == [2, 3] and region["min_epoch"] == 2 and region["threshold"] == 0.153
    assert decision["signals"]["full_weight"]["holding_epochs"] == [3]
    text = " ".join(decision["reasons"])
    for number in ("0.150000", "0.152000", "2.400000", "1.100000"):
        assert number in text
    assert "epoch 3" in decision["reasons"][-2] and "hold up at full weight" in decision["basis"]


def test_when_every_low_loss_epoch_breaks_the_least_broken_is_chosen_and_said_so():
    decision = recommend([row(1, 0.150, 2.0), row(2, 0.151, 1.8), row(3, 0.300, 1.0)], WEIGHTS)
    assert decision["recommended_epoch"] == 2
    assert "breaks least" in decision["basis"] and "weight 0.8" in decision["basis"]


def test_without_weights_around_one_the_choice_falls_back_to_loss_and_says_why():
    rows = [{**row(1, 0.2, None), "distance_to_base": {"0.5": 0.1}},
            {**row(2, 0.1, None), "distance_to_base": {"0.5": 0.1}}]
    decision = recommend(rows, (0.5,))
    assert decision["recommended_epoch"] == 2 and "lack a weight below, at and above 1.0" in decision["basis"]


def test_overfitting_trend_and_missing_effect_are_flagged_with_numbers():
    rows = [row(1, 0.150, 1.0, train=0.30), row(2, 0.160, 1.0, train=0.25), row(3, 0.175, 1.0, train=0.20)]
    decision = recommend(rows, WEIGHTS)
    trend = decision["signals"]["overfitting_trend"]
    assert trend["flagged"] and trend["window_epochs"] == [1, 2, 3]
    assert trend["val_loss_change"] == 0.025 and trend["train_loss_change"] == -0.1
    assert any("rose by 0.025000" in w and "fell by 0.100000" in w for w in decision["warnings"])
    assert decision["recommended_epoch"] == 1

    flat = recommend([row(1, 0.1, 1.0, effect=0.0001), row(2, 0.1, 1.0, effect=0.0001)], WEIGHTS)
    assert flat["recommended_epoch"] == 2  # a tie goes to the later epoch
    assert any("almost no visible effect" in w for w in flat["warnings"])
    assert not flat["signals"]["overfitting_trend"]["flagged"]


def test_unknown_training_loss_leaves_the_trend_unjudged():
    decision = recommend([row(1, 0.2, 1.0, train=None), row(2, 0.1, 1.0, train=None)], WEIGHTS)
    assert decision["signals"]["overfitting_trend"]["note"].startswith("not enough epochs")
    assert fmt(None) == "n/a" and fmt(0.1234564) == "0.123456"
    assert [weight_label(w) for w in (0.0, 0.6, 0.75, 1.0, 1.25, 2.0)] == ["0.0", "0.6", "0.75", "1.0", "1.25", "2.0"]


def test_diverged_epochs_are_never_recommended():
    decision = recommend([row(1, 0.2, 1.0), row(2, None, 1.0)], WEIGHTS)
    assert decision["recommended_epoch"] == 1
    assert any("Epoch 2: the validation loss is not finite" in w for w in decision["warnings"])
    assert round6(float("nan")) is None and round6(0.12345678) == 0.123457
    with pytest.raises(UserError, match="no epoch has a finite validation loss"):
        recommend([row(1, None, 1.0)], WEIGHTS)
