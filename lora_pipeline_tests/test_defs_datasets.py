"""End-to-end: the real Dagster definitions build every sample version from read-only sources."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest

from lora_pipeline.core.datasets.snapshot.manifest import read_manifest, verify_snapshot
from lora_pipeline.core.fileio import read_json
from lora_pipeline.defs import partitions
from lora_pipeline.defs.datasets import EARLY_INSPECTION_TAG, NO_ERRORS_CHECK
from lora_pipeline.defs.metadata import problems_metadata
from lora_pipeline.runs.instance import definitions, instance
from lora_pipeline.runs.jobs import run_job
from lora_pipeline_tests.helpers import make_read_only, tree_state

REPO = Path(__file__).resolve().parents[1]
VERSIONS = ["hardware-design-aesthetic-v1", "hardware-design-aesthetic-v2", "hardware-promoted-merge-v1",
            "hardware-masked-reg-v1"]


def test_definitions_validate(tmp_path):
    """`dagster definitions validate` loads the code location the way the UI does."""
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", str(REPO / "workspace.yaml")],
        cwd=REPO, env={**os.environ, "DAGSTER_HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_definitions_hold_the_contract_assets():
    defs = definitions()
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {"source_batch", "dataset_snapshot", "caption_set", "dataset_report", "lora_epochs",
                    "evaluation_grid"}
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey("lora_epochs")).pools == {"gpu"}


def test_build_every_sample_version_with_read_only_sources(sample_root):
    make_read_only(sample_root.sources)
    before = tree_state(sample_root.sources)  # content, mode and mtime of every source file
    inst = instance()
    partitions.register(inst, partitions.dataset_versions, VERSIONS)
    outcomes = {}
    for version in VERSIONS:
        outcome = outcomes[version] = run_job("build_dataset_job", version, inst)
        assert outcome.check_passed(NO_ERRORS_CHECK) is True, read_json(sample_root.dataset(version) / "report.json")
        snapshot_dir = sample_root.dataset(version)
        info = read_json(snapshot_dir / "snapshot.json")
        assert info["captions_complete"] and verify_snapshot(snapshot_dir).ok
        rows = read_manifest(snapshot_dir)
        images = [r for r in rows if r.kind == "image"]
        captions = [r for r in rows if r.kind == "caption"]
        assert images and len(images) == len(captions)
        for row in images:  # copies, never links
            st = os.lstat(snapshot_dir / row.path)
            assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1
    assert tree_state(sample_root.sources) == before
    # v2 copies v1's images again and adds the turntable renders; the merge version needs merge: true
    v1 = {r.sha256 for r in read_manifest(sample_root.dataset(VERSIONS[0])) if r.kind == "image"}
    v2_rows = [r for r in read_manifest(sample_root.dataset(VERSIONS[1])) if r.kind == "image"]
    assert v1 <= {r.sha256 for r in v2_rows}
    assert {r.source_dataset for r in v2_rows} >= {VERSIONS[0]}
    # v2's snapshot page says what changed against its parent v1; its caption_set page, the captions
    changes = outcomes[VERSIONS[1]].metadata("dataset_snapshot")["changes_from_parent"]
    assert f"Changes from `{VERSIONS[0]}` to `{VERSIONS[1]}`: 12 added, 0 removed, 0 replaced, 0 moved, " \
        "8 unchanged" in changes and "| `turntable-renders-2026-11` | 0 | 12 | 12 | 0 | 0 |" in changes
    assert "0 captions changed" in outcomes[VERSIONS[1]].metadata("caption_set")["caption_changes_from_parent"]
    assert "has no parent version" in outcomes[VERSIONS[0]].metadata("dataset_snapshot")["changes_from_parent"]
    # the masked close-ups carry their masks; the class images sit in kohya's reg/<repeats>_<class>/
    kinds = Counter(r.kind for r in read_manifest(sample_root.dataset(VERSIONS[3])))
    assert kinds == {"image": 11, "caption": 11, "mask": 3, "reg_image": 3, "reg_caption": 3}
    counts = read_json(sample_root.dataset(VERSIONS[3]) / "report.json")["counts"]
    assert (counts["masked_images"], counts["regularisation_by_folder"]) == (3, {"reg/1_appliance": 3})


def test_rebuild_is_a_noop_and_changed_spec_is_refused(sample_root):
    from lora_pipeline.core.errors import UserError

    inst = instance()
    version = VERSIONS[0]
    partitions.register(inst, partitions.dataset_versions, [version])
    run_job("build_dataset_job", version, inst)
    before = tree_state(sample_root.dataset(version))
    # again, as the command line runs it: the images decoded while the captions are checked, the same report
    run_job("build_dataset_job", version, inst, tags={EARLY_INSPECTION_TAG: "1"})
    assert tree_state(sample_root.dataset(version)) == before  # not a byte, mode or mtime changed
    spec = sample_root.spec_file(version)
    spec.write_text(spec.read_text().replace("repeats: 10", "repeats: 12"))
    with pytest.raises(UserError, match="name a new version"):
        run_job("build_dataset_job", version, inst)


def test_the_report_shows_the_buckets_of_the_recipes_that_train_on_the_family(sample_root):
    inst = instance()
    version = VERSIONS[0]
    partitions.register(inst, partitions.dataset_versions, [version])
    run_job("build_dataset_job", version, inst)
    before = read_json(sample_root.dataset(version) / "report.json")["buckets"]
    assert before["recipes"] == [] and before["resolution"] == 512  # no sample recipe trains on this family
    (sample_root.recipes / "small-buckets.yaml").write_text(
        "base_model: tiny-sd\ntrain_on: ['hardware-design-*']\nresolution: 256\nmin_bucket_reso: 128\n"
        "max_bucket_reso: 512\nbucket_reso_steps: 32\n")
    outcome = run_job("build_dataset_job", version, inst)
    assert outcome.check_passed(NO_ERRORS_CHECK) is True and verify_snapshot(sample_root.dataset(version)).ok
    after = read_json(sample_root.dataset(version) / "report.json")["buckets"]
    assert after["recipes"] == ["small-buckets"] and after["resolution"] == 256
    assert after["histogram"] != before["histogram"]
    assert sum(b["count"] for b in after["histogram"]) == sum(b["count"] for b in before["histogram"])
    assert all(b["width"] * b["height"] <= 256 * 256 for b in after["histogram"])


def test_problem_tables_in_the_metadata_are_bounded_but_the_counts_cover_every_problem(tmp_path):
    problems = [{"severity": "warning", "code": "near_duplicate", "file": f"img/{n:04d}.jpg"} for n in range(250)]
    problems.append({"severity": "error", "code": "too_small", "file": "img/x.jpg"})
    meta = problems_metadata(problems, ["severity", "code", "file"], tmp_path / "report.json", limit=100)
    assert len(meta["problems"].value.records) == 100
    assert meta["problems_by_code"].value == {"error: too_small": 1, "warning: near_duplicate": 250}
    assert meta["problems_shown"] == f"100 of 251 (all of them in {tmp_path / 'report.json'})"
