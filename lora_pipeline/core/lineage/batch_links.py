"""Which batches a dataset version took, and which versions took a batch: read from the snapshots themselves.

A version took a batch when one of its images came from it, copied directly (`source_batch`) or through an
earlier version it copies (`origin_batch`, the batch the image entered the pipeline from). The manifest is the
record; `snapshot.json` (its sources and parents) only narrows down which manifests a batch's question reads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from lora_pipeline.core.datasets.snapshot.manifest import (
    IMAGE_KINDS,
    ManifestRow,
    read_manifest,
    read_snapshot_info,
)
from lora_pipeline.core.paths import DataRoot

DIRECT = "direct"


@dataclass
class BatchUse:
    """The images one version took from one batch, and how: `direct` and/or the earlier versions they came
    through."""

    images: int = 0
    through: set[str] = field(default_factory=set)


def batch_uses(rows: Iterable[ManifestRow]) -> dict[str, BatchUse]:
    """{batch: its use} over the image rows of a manifest, sorted by batch."""
    uses: dict[str, BatchUse] = {}
    for row in rows:
        batch = row.origin_batch or row.source_batch
        if row.kind not in IMAGE_KINDS or batch is None:
            continue
        use = uses.setdefault(batch, BatchUse())
        use.images += 1
        use.through.add(row.source_dataset or DIRECT)
    return dict(sorted(uses.items()))


def version_batches(root: DataRoot, version: str) -> dict[str, BatchUse]:
    """The batches a built version took, from its manifest."""
    return batch_uses(read_manifest(root.dataset(version)))


def versions_taking(root: DataRoot, batches: Iterable[str]) -> dict[str, dict[str, BatchUse]]:
    """{batch: {version: its use of the batch}} over the built versions, sorted by version. Only versions whose
    sources name one of the batches, or copy a version that may hold one, have their manifest read (once)."""
    wanted = set(batches)
    infos = {v: read_snapshot_info(root.dataset(v)) for v in root.built_versions()}
    may_hold: dict[str, bool] = {}

    def holds(version: str, seen: frozenset[str] = frozenset()) -> bool:
        if version not in may_hold:
            info = infos.get(version)
            if info is None or version in seen:
                return False
            may_hold[version] = not info.sources or any(  # a snapshot.json without sources: read the manifest
                (s.kind == "batch" and s.name in wanted) or (s.kind == "dataset" and holds(s.name, seen | {version}))
                for s in info.sources
            )
        return may_hold[version]

    found: dict[str, dict[str, BatchUse]] = {b: {} for b in sorted(wanted)}
    for version in infos:
        if holds(version):
            for batch, use in version_batches(root, version).items():
                if batch in found:
                    found[batch][version] = use
    return found
