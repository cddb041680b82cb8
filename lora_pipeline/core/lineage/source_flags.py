"""What happened to a version's source batches after it was built: a batch retired since, or its rights changed.

A version keeps the rights it was built with (snapshot.json `rights`); these flags compare them with the batches'
histories now, for `provenance` and for `retire`, which names the versions a retirement touches.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from lora_pipeline.core.datasets.snapshot.manifest import IMAGE_KINDS, read_manifest, read_snapshot_info
from lora_pipeline.core.datasets.sources.retired import RetirementRecord, origin_of, retirement
from lora_pipeline.core.datasets.sources.rights import UNKNOWN, BatchRights, rights_change_since
from lora_pipeline.core.paths import SNAPSHOT, DataRoot
from lora_pipeline.core.schema import Record


class BatchFlags(Record):
    """One origin batch of a version: its images, its rights when built and now, and whether it is retired."""

    batch: str
    images: int
    rights_at_build: BatchRights
    rights_now: BatchRights
    rights_changed_at: str | None = None  # when the first record that changed its terms after the build was made
    rights_changed_by: str | None = None
    retired: RetirementRecord | None = None  # the record that retired it, while it is retired

    @property
    def lines(self) -> list[str]:
        """What a person reads: the batch, its rights, and what changed since the build."""
        out = [f"batch {self.batch}: {self.images} images, rights {self.rights_at_build.label} when built"]
        if self.rights_changed_at:
            out.append(
                f"  rights changed after the version was built: now {self.rights_now.label} "
                f"(recorded {self.rights_changed_at} by {self.rights_changed_by})"
            )
        if self.retired:
            out.append(f"  RETIRED: {self.retired.line}")
        return out


def version_flags(root: DataRoot, snapshot_dir: Path) -> list[BatchFlags]:
    """The flags of every batch the version's images first came from, sorted by batch."""
    rows = [r for r in read_manifest(snapshot_dir) if r.kind in IMAGE_KINDS]
    built = read_snapshot_info(snapshot_dir).rights
    images = Counter(b for r in rows if (b := origin_of(r)))
    rights_in_rows = {origin_of(r): r.rights for r in rows if r.rights}
    out = []
    for batch, n in sorted(images.items()):
        at_build = built.get(batch) or BatchRights(rights=rights_in_rows.get(batch, UNKNOWN))
        now, changed = rights_change_since(root, batch, at_build)
        out.append(
            BatchFlags(
                batch=batch,
                images=n,
                rights_at_build=at_build,
                rights_now=now,
                rights_changed_at=changed.recorded_at if changed else None,
                rights_changed_by=changed.recorded_by if changed else None,
                retired=retirement(root, batch),
            )
        )
    return out


def retired_findings(version: str, flags: list[BatchFlags]) -> list[str]:
    """One finding per retired batch the version was built on."""
    return [
        f"dataset version {version} was built on batch {f.batch} ({f.images} images), {f.retired.line}"
        for f in flags
        if f.retired
    ]


def versions_built_on(root: DataRoot, batch: str) -> list[str]:
    """The built versions holding images that first came from `batch`, sorted."""
    out = []
    for version in root.built_versions():
        folder = root.dataset(version)
        if (folder / SNAPSHOT).is_file() and any(origin_of(r) == batch for r in read_manifest(folder)):
            out.append(version)
    return out


def retirement_report(root: DataRoot, record: RetirementRecord) -> tuple[dict[str, Any], str]:
    """(JSON data, text) of `lora-pipeline retire` / `unretire`: the record and the built versions it touches."""
    versions = versions_built_on(root, record.batch)
    text = f"batch {record.batch}: {record.line}\nbuilt versions holding its images: {', '.join(versions) or 'none'}"
    return {**record.to_json_dict(), "versions_built_on": versions}, text
