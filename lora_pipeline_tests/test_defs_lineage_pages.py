"""Lineage in the UI (defs/lineage_pages.py, defs/partitions.py): each version's page names exactly the batches it
took, each batch's page the versions that took it (directly, through a parent, through a merge), and the asset
graph claims no partition link it cannot know. Real builds through the definitions on a real instance."""

from __future__ import annotations

import dagster as dg
import pytest

from lora_pipeline.core.datasets.sources.retired import retire
from lora_pipeline.core.errors import UserError
from lora_pipeline.defs import partitions
from lora_pipeline.runs.instance import definitions, instance
from lora_pipeline.runs.jobs import run_job

V1, V2, MERGE = "hardware-design-aesthetic-v1", "hardware-design-aesthetic-v2", "hardware-promoted-merge-v1"
CURATED, TURNTABLE, PROMOTED = "curated-2026-10", "turntable-renders-2026-11", "promoted-candidates-2026-11"


def _batch_page(inst: dg.DagsterInstance, batch: str) -> dict:
    """The batch's latest page: its last observation's metadata (written by the runs of the versions that took
    it), else its materialization's."""
    key = dg.AssetKey("source_batch")
    observed = inst.fetch_observations(dg.AssetRecordsFilter(key, asset_partitions=[batch]), limit=1).records
    if observed:
        return observed[0].asset_observation.metadata
    (materialized,) = inst.fetch_materializations(dg.AssetRecordsFilter(key, asset_partitions=[batch]), limit=1).records
    return materialized.asset_materialization.metadata


def test_pages_link_a_version_to_exactly_its_batches_and_a_batch_to_its_versions(sample_root):
    inst = instance()
    partitions.register(inst, partitions.source_batches, sample_root.ready_batches())
    partitions.register(inst, partitions.dataset_versions, [V1, V2, MERGE])
    run_job("register_batch_job", CURATED, inst, quiet=True)
    assert _batch_page(inst, CURATED)["versions"].value == []  # fingerprinted before any version took it

    built = {v: run_job("build_dataset_job", v, inst, quiet=True).metadata("dataset_snapshot") for v in (V1, V2, MERGE)}
    assert built[V1]["batches"] == [CURATED]
    assert built[V2]["batches"] == [CURATED, TURNTABLE]  # v1's images through v1, and the renders directly
    assert built[MERGE]["batches"] == [CURATED, PROMOTED, TURNTABLE]  # v2's (so v1's) and its own batch
    page = built[V2]["lineage"]
    assert f"/assets/source_batch?view=events&partition={CURATED}" in page
    assert f"/assets/dataset_snapshot?view=partitions&partition={V1}" in page
    assert "class-images" not in page and "masked-closeups" not in page  # no batch it did not take

    # each batch's page lists the versions that took it, directly, through a parent or through a merge
    assert _batch_page(inst, CURATED)["versions"].value == [V1, V2, MERGE]
    assert _batch_page(inst, TURNTABLE)["versions"].value == [V2, MERGE]
    assert _batch_page(inst, PROMOTED)["versions"].value == [MERGE]
    text = _batch_page(inst, CURATED)["lineage"].value
    snapshot = "/assets/dataset_snapshot?view=partitions&partition="
    assert f"[{MERGE}]({snapshot}{MERGE}) | 8 | [{V2}]({snapshot}{V2}) |" in text  # 8 curated images, through v2
    assert f"[{V1}]({snapshot}{V1}) | 8 | direct |" in text


def test_a_retired_batch_is_flagged_on_its_page_and_on_the_page_of_a_version_built_on_it(sample_root):
    """v2 built after v1's batch was retired (through v1, a retired batch's images still come along and the report
    blocks them): v2's page names the batch RETIRED, and the batch's page, refreshed by v2's run, says who retired
    it, when and why above the versions built on it."""
    inst = instance()
    partitions.register(inst, partitions.source_batches, sample_root.ready_batches())
    partitions.register(inst, partitions.dataset_versions, [V1, V2])
    run_job("build_dataset_job", V1, inst, quiet=True)
    assert "retired" not in _batch_page(inst, CURATED)
    record = retire(sample_root, CURATED, "licence withdrawn by the studio")
    v2 = run_job("build_dataset_job", V2, inst, quiet=True).metadata("dataset_snapshot")
    assert v2["retired_batches"] == [CURATED]
    assert f"**RETIRED: `{CURATED}`** was {record.line}; `{V2}` is built on it." in v2["lineage"]
    assert f"[{CURATED}](/assets/source_batch?view=events&partition={CURATED}) RETIRED | 8 |" in v2["lineage"]
    assert f"[{TURNTABLE}](/assets/source_batch?view=events&partition={TURNTABLE}) |" in v2["lineage"]

    page = _batch_page(inst, CURATED)
    assert page["retired"].value["reason"] == "licence withdrawn by the studio"
    text = page["lineage"].value
    assert f"**RETIRED: `{CURATED}`** was {record.line}; every version below" in text
    assert text.index("RETIRED") < text.index("| version |") < text.index(V1) < text.index(V2)
    renders = _batch_page(inst, TURNTABLE)
    assert "retired" not in renders and "RETIRED" not in renders["lineage"].value


def test_the_asset_graph_claims_no_partition_link_it_cannot_know(sample_root):
    """Dagster has no data-dependent mapping between dynamic partitions: the edges map no partition, where
    `AllPartitionMapping` linked every batch to every version (and every version to every training run)."""
    inst = instance()
    partitions.register(inst, partitions.source_batches, sample_root.ready_batches())
    partitions.register(inst, partitions.dataset_versions, [V1, V2])
    key = partitions.training_key(V2, "demo-tiny")
    partitions.register(inst, partitions.training_runs, [key])
    graph = definitions().resolve_asset_graph()
    with dg.partition_loading_context(dynamic_partitions_store=inst):
        for child, partition, parent in (
            ("dataset_snapshot", V2, "source_batch"),
            ("lora_epochs", key, "dataset_report"),
        ):
            parents = graph.get_parent_partition_keys_for_child(partition, dg.AssetKey(parent), dg.AssetKey(child))
            assert list(parents.partitions_subset.get_partition_keys()) == []
        # and a batch's new fingerprint marks no version's snapshot as depending on it
        children = graph.get_children_partitions(dg.AssetKey("source_batch"), CURATED)
    assert not children


def test_a_training_key_typed_without_both_halves_is_one_line():
    assert partitions.split_training_key(partitions.training_key(V1, "demo-tiny")) == (V1, "demo-tiny")
    for key in ("hardware-design-aesthetic-v1", "|demo-tiny", "v1|", "v1|a|b"):
        with pytest.raises(UserError, match="is not '<dataset version>|<recipe>'"):
            partitions.split_training_key(key)
