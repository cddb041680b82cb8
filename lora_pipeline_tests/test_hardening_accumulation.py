"""gradient_accumulation_steps where it cannot accumulate (issue 27): a step stays inside one aspect-ratio bucket,
so when every bucket holds at most train_batch_size images the option changes nothing. The run says so in one
warning and the LoRA header records the accumulation it had, not the recipe's."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from lora_pipeline.core.training.kohya.lora_file import read_lora_metadata
from lora_pipeline_tests.helpers import tiny_recipe, train


def _tensors(path: str) -> dict:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def test_accumulation_that_cannot_happen_is_a_warning_and_the_header_says_what_ran(train_snapshot):
    root = train_snapshot(n=4, repeats=2)  # 8 samples per epoch, fewer in any one bucket
    plain, _ = train(root, tiny_recipe(epochs=1, train_batch_size=8), "plain")
    asked, lines = train(root, tiny_recipe(epochs=1, train_batch_size=8, gradient_accumulation_steps=3), "asked")
    warning = ("gradient_accumulation_steps: 3 accumulates at most 1 batch(es) of 8 here: a step stays inside one "
               "aspect-ratio bucket and no bucket holds more images (the LoRA header records 1)")
    assert asked.warnings == [warning] and f"warning: {warning}" in lines  # before the fix: silent
    header = read_lora_metadata(Path(asked.epochs[-1]["file"]))
    assert header["ss_gradient_accumulation_steps"] == "1"  # before the fix: "3"
    assert asked.loss_history == plain.loss_history  # it is a no-op: the same steps ...
    one, other = _tensors(plain.epochs[-1]["file"]), _tensors(asked.epochs[-1]["file"])
    assert one.keys() == other.keys() and all((one[k] == other[k]).all() for k in one)  # ... and weights

    # where a bucket does hold more than a batch, the header keeps the recipe's value and nothing is said
    accumulated, _ = train(root, tiny_recipe(epochs=1, train_batch_size=1, gradient_accumulation_steps=2), "acc")
    assert accumulated.warnings == []
    assert read_lora_metadata(Path(accumulated.epochs[-1]["file"]))["ss_gradient_accumulation_steps"] == "2"
