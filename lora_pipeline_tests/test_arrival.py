"""Safe arrival (core/datasets/sources/arrival.py): a folder under sources/ becomes a batch only when its name is
not in transit, `_READY` is there and its listing held still between two looks; a registered batch that changes
is refused by name. The sensor is evaluated as the daemon evaluates it, against a real Dagster instance."""

from __future__ import annotations

import json
import os

import pytest

from lora_pipeline.core.datasets.snapshot.snapshot import build_snapshot
from lora_pipeline.core.datasets.sources.arrival import (
    look_at_arrivals,
    record_registration,
    registration_file,
)
from lora_pipeline.core.datasets.sources.batches import scan_batch
from lora_pipeline.core.datasets.spec import load_spec
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.runs.instance import instance
from lora_pipeline.runs.jobs import run_job
from lora_pipeline_tests.helpers import assert_one_line_error, cli, land_batch, sensor_context, sensor_tick

VERSION = "hardware-design-aesthetic-v1"  # takes batch curated-2026-10


def _tick(inst, root, cursor):
    """One tick of source_batch_sensor; the partitions it adds are added, as the daemon does. (registered, cursor)"""
    result = sensor_tick("source_batch_sensor", sensor_context(inst, root, cursor))
    for request in result.dynamic_partitions_requests or []:
        if request.partitions_def_name == "source_batches":
            inst.add_dynamic_partitions("source_batches", list(request.partition_keys))
    registered = {r.partition_key for r in result.run_requests if r.job_name == "register_batch_job"}
    return registered, result.cursor


def test_in_transit_and_still_written_folders_are_never_registered_a_settled_one_is(sample_root, monkeypatch):
    monkeypatch.setenv("LORA_PIPELINE_ARRIVAL_SETTLE_SECONDS", "0")
    inst = instance()
    inst.add_dynamic_partitions("source_batches", sample_root.ready_batches())  # the committed ones are known
    for suffix in (".tmp", ".part", ".partial"):
        land_batch(sample_root, f"curated-2027-02{suffix}", ["teal"])  # a staging copy, `_READY` came along
    land_batch(sample_root, "curated-2027-03", ["teal"])

    registered, cursor = _tick(inst, sample_root, None)
    assert registered == set()  # a first look registers nothing
    (sample_root.batch("curated-2027-03") / "late-9.png").write_bytes(b"half an image")  # still being written
    registered, cursor = _tick(inst, sample_root, cursor)
    assert registered == set()  # the listing moved between the two looks
    registered, cursor = _tick(inst, sample_root, cursor)
    assert registered == {"curated-2027-03"}  # held still since the last look: registered once
    assert _tick(inst, sample_root, cursor)[0] == set()
    known = set(inst.get_dynamic_partitions("source_batches"))
    assert not any(b.startswith("curated-2027-02") for b in known)
    # a glob takes no folder in transit either
    assert not any(b.startswith("curated-2027-02") for b in sample_root.ready_batches())


def test_the_settle_interval_is_measured_between_the_looks(tmp_path, make_batch):
    root = DataRoot(tmp_path)
    make_batch(root, "b1", {"a.png": b"x"})
    first = look_at_arrivals(root, ["b1"], None, now=100.0, settle_seconds=5)
    assert first.settled == [] and first.waiting == ["b1"]
    soon = look_at_arrivals(root, ["b1"], first.cursor, now=103.0, settle_seconds=5)
    assert soon.settled == []  # unchanged, but only 3 s after the first look
    later = look_at_arrivals(root, ["b1"], soon.cursor, now=105.0, settle_seconds=5)
    assert later.settled == ["b1"]  # the first look's time is kept while nothing moves
    (root.batch("b1") / ".a.png.partial").write_bytes(b"")  # a copy tool's hidden temp file is part of the listing
    moved = look_at_arrivals(root, ["b1"], soon.cursor, now=200.0, settle_seconds=5)
    assert moved.settled == [] and json.loads(moved.cursor)["arrivals"]["b1"]["since"] == 200.0
    assert look_at_arrivals(root, ["b1"], "not json", now=300.0, settle_seconds=0).settled == []


def test_a_batch_changed_after_registration_is_refused_naming_the_file(sample_root):
    inst = instance()
    inst.add_dynamic_partitions("source_batches", ["curated-2026-10"])
    run_job("register_batch_job", "curated-2026-10", inst, quiet=True)
    record = json.loads(registration_file(sample_root, "curated-2026-10").read_text())
    assert record["batch"] == "curated-2026-10" and "cur-01-sage.png" in record["files"]

    image = sample_root.batch("curated-2026-10") / "cur-02-coral.png"
    image.chmod(0o644)
    with open(image, "ab") as f:
        f.write(b"\0")  # one more byte, after registration
    assert_one_line_error(
        cli("build", VERSION, check=False), str(image), "changed after it was registered", "size changed"
    )
    assert not sample_root.dataset(VERSION).exists()
    # registering it again is refused the same way, and the record keeps what was registered
    scan = scan_batch(sample_root, "curated-2026-10")
    with pytest.raises(UserError, match="cur-02-coral.png: batch 'curated-2026-10' changed after it was registered"):
        record_registration(sample_root, scan, "x")
    assert json.loads(registration_file(sample_root, "curated-2026-10").read_text()) == record

    image.write_bytes(image.read_bytes()[:-1])  # the size is back, the mtime is not
    with pytest.raises(UserError, match="cur-02-coral.png: .*modified"):
        build_snapshot(sample_root, load_spec(sample_root.spec_file(VERSION)), "test")
    os.utime(image, ns=(record["files"]["cur-02-coral.png"][1],) * 2)  # as registered again
    (sample_root.batch("curated-2026-10") / "zz-new.png").write_bytes(b"")
    with pytest.raises(UserError, match="zz-new.png: .*registered \\(added\\)"):
        build_snapshot(sample_root, load_spec(sample_root.spec_file(VERSION)), "test")


def test_intake_refuses_a_batch_id_that_ends_like_a_copy_in_transit(tmp_path):
    from lora_pipeline.core.datasets.sources.batches import intake

    handoff = tmp_path / "handoff"
    handoff.mkdir()
    (handoff / "a.png").write_bytes(b"not read: the name is refused first")
    root = DataRoot(tmp_path / "data")
    with pytest.raises(UserError, match=r"batch id 'curated-2027-04.part' ends like a copy still in transit"):
        intake(handoff, root, "curated-2027-04.part")
    assert not root.sources.exists() or not any(root.sources.iterdir())  # nothing written
