"""The rights of a version's images in its report: counts by rights, and the spec's `allowed_rights` as a blocking
check. Both read only the manifest's `rights` (fixed when the snapshot was built) and the spec, so the report
stays a function of the version."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from lora_pipeline.core.datasets.problems import Problem, problem
from lora_pipeline.core.datasets.snapshot.manifest import IMAGE_KINDS, ManifestRow
from lora_pipeline.core.datasets.sources.retired import origin_of
from lora_pipeline.core.datasets.sources.rights import UNKNOWN
from lora_pipeline.core.datasets.spec import DatasetSpec


def image_rights(rows: Iterable[ManifestRow]) -> dict[str, str]:
    """{image path: its rights} of the training and regularisation images; an image without a record is unknown."""
    return {r.path: r.rights or UNKNOWN for r in rows if r.kind in IMAGE_KINDS}


def rights_counts(rights: Mapping[str, str]) -> dict[str, int]:
    """{rights: images}, sorted by rights."""
    return dict(sorted(Counter(rights.values()).items()))


def rights_problems(spec: DatasetSpec, rows: Iterable[ManifestRow], scope: str) -> list[Problem]:
    """An error for every image whose rights the spec's `allowed_rights` does not list (none when it lists none)."""
    allowed = spec.allowed_rights
    if not allowed:
        return []
    out = []
    for row in rows:
        rights = row.rights or UNKNOWN
        if row.kind in IMAGE_KINDS and rights not in allowed:
            message = (
                f"rights '{rights}' (batch {origin_of(row) or '?'}) are not in allowed_rights "
                f"[{', '.join(allowed)}]; record the batch's rights (`lora-pipeline rights`) and build a new "
                "version, or leave the batch out"
            )
            out.append(problem(row.path, "rights_not_allowed", "error", message, scope))
    return out
