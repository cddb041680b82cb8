"""Errors that were tracebacks where one line belongs (issue 27): a full disk under MLflow's SQLite store while a
training writes to it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import MLFLOW_DB
from lora_pipeline.core.training.run.tracking import TrainingTracker
from lora_pipeline.core.training.run.trainer import train_lora
from lora_pipeline_tests.helpers import STARTED_AT, small_tmpfs, tiny_recipe


def _fill(folder: Path) -> None:
    with contextlib.suppress(OSError), open(folder / "filler", "wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs (a real full disk) needs root")
def test_a_full_disk_under_the_mlflow_store_stops_training_in_one_line(train_snapshot):
    root = train_snapshot(n=4, repeats=2)
    with small_tmpfs(root.root / "small-mlflow", "2m") as store:
        class FillsUp(TrainingTracker):
            """The run is open in MLflow and its dataset logged when the disk fills up (training starts next)."""

            def log_dataset(self, *args, **kwargs) -> None:
                super().log_dataset(*args, **kwargs)
                _fill(store)

        def run(tracker: TrainingTracker):
            return train_lora(root, "train-v1", tiny_recipe(epochs=1), out_dir=root.root / "out", tracker=tracker,
                              provenance={"code_commit": "test"}, started_at=STARTED_AT, device="cpu", log=print)

        with pytest.raises(UserError) as stopped:  # before the fix: MlflowException "database or disk is full"
            run(FillsUp(store))  # the store is created while there is room (about 1 MB)
        assert str(stopped.value) == (f"{store / MLFLOW_DB}: No space left on device "
                                      "(training stopped; a rerun resumes after the last saved epoch)")
        (store / "filler").unlink()
        result = run(TrainingTracker(store))  # room again: the rerun finishes
        assert [e["epoch"] for e in result.epochs] == [1]
