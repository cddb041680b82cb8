"""Retiring a batch, copy-only: a record (who, when, why) that globs and the batch sensor honour, that a spec naming
the batch is refused by, that leaves every file of the batch as it was, and that `unretire` undoes."""

from __future__ import annotations

import pytest

from lora_pipeline.core.datasets.checks.report import read_report
from lora_pipeline.core.datasets.snapshot.manifest import read_manifest
from lora_pipeline.core.datasets.snapshot.snapshot import build_snapshot
from lora_pipeline.core.datasets.sources.decisions import batch_ref
from lora_pipeline.core.datasets.sources.retired import (
    is_retired,
    retire,
    retired_batches,
    retirement_history,
    unretire,
)
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.lineage.source_flags import retirement_report, version_flags
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.runs.instance import instance
from lora_pipeline_tests.helpers import (
    captioned_batch,
    finish_version,
    land_batch,
    sensor_context,
    sensor_tick,
    tree_state,
    write_spec,
)


def _batches(rows) -> set[str]:
    return {r.origin_batch for r in rows if r.kind == "image"}


@pytest.fixture
def cur(tmp_path) -> DataRoot:
    root = DataRoot(tmp_path / "data")
    captioned_batch(root, "cur-a", [1, 2])
    captioned_batch(root, "cur-b", [3, 4])
    return root


def test_retire_and_unretire_are_records_with_who_when_and_why(cur):
    assert not is_retired(cur, "cur-b") and retired_batches(cur) == {}
    record = retire(cur, "cur-b", "banned word in   captions")
    assert is_retired(cur, "cur-b") and list(retired_batches(cur)) == ["cur-b"]
    assert record.reason == "banned word in captions" and record.recorded_by and record.recorded_at
    data, text = retirement_report(cur, record)
    assert data["action"] == "retire" and data["versions_built_on"] == [] and "retired" in text
    with pytest.raises(UserError, match="already retired"):
        retire(cur, "cur-b", "again")
    with pytest.raises(UserError, match="--reason must say why"):
        unretire(cur, "cur-b", "  ")
    with pytest.raises(UserError, match="is not retired"):
        unretire(cur, "cur-a", "never was")
    with pytest.raises(UserError, match="batch folder not found"):
        retire(cur, "no-such-batch", "typo")
    unretire(cur, "cur-b", "captions fixed upstream")
    assert not is_retired(cur, "cur-b")
    assert [r.action for r in retirement_history(cur, "cur-b")] == ["retire", "unretire"]
    assert batch_ref("batch:cur-b") == batch_ref("cur-b") == "cur-b"
    with pytest.raises(UserError, match="not batch:<id>"):
        batch_ref("version:cur-b")


def test_a_retired_batch_is_skipped_by_the_glob_refused_by_name_and_left_byte_identical(cur):
    before = tree_state(cur.sources)
    retire(cur, "cur-b", "too-small images")
    spec = write_spec(cur, "cur-v1", [{"batch": "cur-*"}])
    build_snapshot(cur, spec, "test")
    finish_version(cur, spec)
    assert _batches(read_manifest(cur.dataset("cur-v1"))) == {"cur-a"}

    named = write_spec(cur, "named-v1", [{"batch": "cur-a"}, {"batch": "cur-b"}])
    with pytest.raises(UserError) as refused:
        build_snapshot(cur, named, "test")
    line = str(refused.value)
    assert "\n" not in line and line.startswith(str(cur.spec_file("named-v1")))
    assert "batch 'cur-b' is retired" in line and "too-small images" in line and "unretire batch:cur-b" in line
    only_retired = write_spec(cur, "only-v1", [{"batch": "cur-b*"}])
    with pytest.raises(UserError, match=r"matches no ready batch \(retired: cur-b\)"):
        build_snapshot(cur, only_retired, "test")
    assert not cur.dataset("named-v1").exists()
    assert tree_state(cur.sources) == before  # not a byte, mode, time or inode of any batch changed

    unretire(cur, "cur-b", "fixed")
    again = write_spec(cur, "cur-v2", [{"batch": "cur-*"}])
    build_snapshot(cur, again, "test")
    assert _batches(read_manifest(cur.dataset("cur-v2"))) == {"cur-a", "cur-b"}


def test_versions_built_on_a_retired_batch_are_flagged_and_keep_building_as_before(cur):
    spec = write_spec(cur, "cur-v1", [{"batch": "cur-*"}])
    build_snapshot(cur, spec, "test")
    finish_version(cur, spec)
    record = retire(cur, "cur-b", "licence withdrawn")
    assert retirement_report(cur, record)[0]["versions_built_on"] == ["cur-v1"]
    flags = {f.batch: f for f in version_flags(cur, cur.dataset("cur-v1"))}
    assert flags["cur-b"].retired.reason == "licence withdrawn" and flags["cur-a"].retired is None
    assert not build_snapshot(cur, spec, "test").created  # a built version is still a no-op to build again

    reuse = write_spec(cur, "cur-v2", [{"dataset": "cur-v1"}])  # an earlier version still holds its images
    build_snapshot(cur, reuse, "test")
    finish_version(cur, reuse)
    report = read_report(cur.dataset("cur-v2"))
    retired_rows = [p for p in report.problems if p["code"] == "retired_batch"]
    assert not report.passed and len(retired_rows) == 2 and all(p["severity"] == "error" for p in retired_rows)
    assert "first came from batch 'cur-b', retired" in retired_rows[0]["message"]


def test_the_batch_sensor_skips_a_retired_batch_until_it_is_unretired(sample_root):
    inst = instance()
    first = sensor_tick("source_batch_sensor", sensor_context(inst, sample_root))
    for request in first.dynamic_partitions_requests or []:
        inst.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    land_batch(sample_root, "curated-2027-01", ["teal"])
    retire(sample_root, "curated-2027-01", "banned word in a caption")
    before = tree_state(sample_root.batch("curated-2027-01"))
    tick = sensor_tick("source_batch_sensor", sensor_context(inst, sample_root))
    assert not tick.run_requests and "curated-2027-01" not in inst.get_dynamic_partitions("source_batches")
    assert tree_state(sample_root.batch("curated-2027-01")) == before
    unretire(sample_root, "curated-2027-01", "caption fixed")
    tick = sensor_tick("source_batch_sensor", sensor_context(inst, sample_root))
    assert [r.partition_key for r in tick.run_requests] == ["curated-2027-01"]
