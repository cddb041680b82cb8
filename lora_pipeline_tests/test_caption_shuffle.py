"""Caption shuffling: the first keep_tokens tags stay, the rest move, reproducibly per (seed, epoch, step)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from lora_pipeline.core.training.inputs.caption_shuffle import shuffle_caption, step_captions

CAPTION = "trg, red body, matte finish, front view, round screen"


def test_keep_tokens_hold_the_first_tags_while_the_others_move():
    positions: dict[str, set[int]] = defaultdict(set)
    for step in range(200):
        (shuffled,) = step_captions([CAPTION], ",", 1, True, seed=3, epoch=1, step=step)
        tags = shuffled.split(", ")
        assert tags[0] == "trg" and sorted(tags) == sorted(CAPTION.split(", "))
        for index, tag in enumerate(tags):
            positions[tag].add(index)
    assert positions["trg"] == {0}
    assert all(positions[tag] == {1, 2, 3, 4} for tag in CAPTION.split(", ")[1:])

    for _ in range(50):
        kept = shuffle_caption(CAPTION, ",", 2, np.random.default_rng(_)).split(", ")
        assert kept[:2] == ["trg", "red body"]


def test_shuffles_are_reproducible_per_seed_epoch_and_step():
    batch = [CAPTION, "trg, side view, glossy finish, blue body"]
    first = step_captions(batch, ",", 1, True, seed=3, epoch=2, step=5)
    assert step_captions(batch, ",", 1, True, seed=3, epoch=2, step=5) == first
    others = {tuple(step_captions(batch, ",", 1, True, seed=3, epoch=2, step=s)) for s in range(6, 16)}
    assert len(others) > 1
    assert step_captions(batch, ",", 1, False, seed=3, epoch=2, step=5) == batch  # shuffle_caption: false


def test_custom_separator_and_keep_tokens_zero():
    tags = {tuple(step_captions(["a;b;c"], ";", 0, True, seed=1, epoch=1, step=s)[0].split("; ")) for s in range(60)}
    assert {t[0] for t in tags} == {"a", "b", "c"}
