"""A sensor tick touches only what changed, however long the history (issue 26; core/datasets/sources/watch.py).

A small synthetic history (benchmarks/year_history.py without the builds: 200 registered batches, 50 registered
versions) and the sensors evaluated as the daemon evaluates them; what a tick reads is counted with Python's audit
events (every folder listed, every file opened under the data root), not timed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.year_history import build_history, land_batch
from lora_pipeline.core.paths import REPO_ROOT, DataRoot
from lora_pipeline.runs.instance import instance
from lora_pipeline_tests.helpers import sensor_context, sensor_tick

_seen: list[tuple[str, str]] | None = None  # (event, path) while a tick is counted


def _audit(event: str, args: tuple) -> None:
    if _seen is not None and event in ("os.scandir", "os.listdir", "open") and args and args[0] is not None:
        _seen.append((event, str(args[0])))


sys.addaudithook(_audit)


def _counted_tick(name: str, inst, root: DataRoot, cursor: str | None):
    """One tick; (its result, the folders it listed and the files it opened under the data root)."""
    global _seen
    _seen = []
    try:
        result = sensor_tick(name, sensor_context(inst, root, cursor))
    finally:
        seen, _seen = _seen, None
    under = [(e, p) for e, p in seen if p.startswith(str(root.root))]
    listed = {Path(p).relative_to(root.root).as_posix() for e, p in under if e != "open"}
    opened = {Path(p).relative_to(root.root).as_posix() for e, p in under if e == "open"}
    return result, listed, opened


def _apply(inst, result) -> None:
    """What the daemon does with a tick's partition requests."""
    for request in result.dynamic_partitions_requests or []:
        inst.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))


@pytest.fixture
def year(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_PIPELINE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORA_PIPELINE_ARRIVAL_SETTLE_SECONDS", "0")
    root = DataRoot(tmp_path / "data")
    inst = instance()
    history = build_history(root, inst, batches=200, versions=50, trainings=0,
                            template=REPO_ROOT / "data/recipes/demo-tiny.yaml", build=False)
    assert len(history.batches) == 200 and len(history.versions) == 50
    return inst, root


def _settled(root: DataRoot, cursor: str | None) -> str | None:
    """The cursor, as seen a while later: a folder changed within the last 2 s is listed again
    (watch.TRUST_AFTER_S), so the watched folders' times are set 10 s back instead of sleeping."""
    import json

    back = time.time_ns() - 10 * 10**9
    state = json.loads(cursor or "{}")
    for folder in (root.sources, root.specs, root.recipes):
        os.utime(folder, ns=(back, back))
        if folder.name in state:
            state[folder.name]["mtime_ns"] = back
    return json.dumps(state)


def test_a_sensor_tick_reads_only_what_changed(year):
    """One history for both sensors (building it is most of the test's time)."""
    inst, root = year
    _batch_sensor_reads_only_the_new_batch(inst, root)
    _spec_sensor_reads_only_the_new_spec(inst, root)


def _batch_sensor_reads_only_the_new_batch(inst, root: DataRoot) -> None:
    first, listed, _ = _counted_tick("source_batch_sensor", inst, root, None)
    assert listed == {"sources"}  # no cursor: sources/ is listed, no registered batch is looked into
    cursor = _settled(root, first.cursor)
    steady, listed, opened = _counted_tick("source_batch_sensor", inst, root, cursor)
    assert (listed, opened) == (set(), set()) and not steady.run_requests  # nothing new: nothing read

    land_batch(root, "fam003-b90000", seed=1)
    looked, listed, opened = _counted_tick("source_batch_sensor", inst, root, steady.cursor)
    assert listed == {"sources", "sources/fam003-b90000"} and opened == set()  # its listing, nothing else
    done, listed, opened = _counted_tick("source_batch_sensor", inst, root, looked.cursor)
    assert [r.partition_key for r in done.run_requests] == ["fam003-b90000"]
    # a batch landed: the auto-rebuild looks at the specs (read once in this process, then by their stat)
    assert listed <= {"sources", "sources/fam003-b90000", "specs", "recipes"}
    assert not any(p.startswith("sources/") and "fam003-b90000" not in p for p in opened)  # no other batch read
    _apply(inst, done)

    land_batch(root, "fam003-b90001", seed=2)  # the next batch: no spec is read again
    looked, _, _ = _counted_tick("source_batch_sensor", inst, root, done.cursor)
    done, listed, opened = _counted_tick("source_batch_sensor", inst, root, looked.cursor)
    assert [r.partition_key for r in done.run_requests] == ["fam003-b90001"]
    assert not any(p.startswith(("sources/", "specs/")) and "fam003-b90001" not in p for p in opened), opened


def _spec_sensor_reads_only_the_new_spec(inst, root: DataRoot) -> None:
    first, listed, opened = _counted_tick("spec_sensor", inst, root, None)
    assert listed == {"specs", "recipes"} and not any(p.startswith("specs/") for p in opened)  # all registered
    cursor = _settled(root, first.cursor)
    steady, listed, opened = _counted_tick("spec_sensor", inst, root, cursor)
    assert (listed, opened) == (set(), set())

    spec = {"name": "newfam-v1", "trigger": "trg", "repeats": 2, "sources": [{"batch": "fam001-b00000"}]}
    root.spec_file("newfam-v1").write_text(yaml.safe_dump(spec))
    root.spec_file("broken-v1").write_text("name: broken-v1\nrepeats: [\n")  # does not load: kept pending
    tick, listed, opened = _counted_tick("spec_sensor", inst, root, steady.cursor)
    assert [r.partition_key for r in tick.run_requests] == ["newfam-v1"]
    assert {p for p in opened if p.startswith("specs/")} == {"specs/newfam-v1.yaml", "specs/broken-v1.yaml"}
    _apply(inst, tick)
    spec["name"] = "broken-v1"
    root.spec_file("broken-v1").write_text(yaml.safe_dump(spec))
    fixed, listed, opened = _counted_tick("spec_sensor", inst, root, _settled(root, tick.cursor))
    assert [r.partition_key for r in fixed.run_requests] == ["broken-v1"]  # fixed in place: the pending one
    assert "specs" not in listed and {p for p in opened if p.startswith("specs/")} == {"specs/broken-v1.yaml"}
