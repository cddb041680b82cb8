"""What a snapshot will hold: planned files, the plan, and dataset version names (family, -vN).

The plan types live here, apart from the build (`snapshot.py`) and the copy (`snapshot_copy.py`), so both
can use them without importing each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lora_pipeline.core.datasets.problems import Problem
from lora_pipeline.core.datasets.sources.hashcache import ImageSize
from lora_pipeline.core.datasets.spec import DatasetSpec, SourceRef
from lora_pipeline.core.paths import DataRoot

VERSION_SUFFIX = re.compile(r"-v(\d+)$")


def family(name: str) -> str:
    """A dataset's family: its name without a trailing -v<N> (`hw-aesthetic-v3` -> `hw-aesthetic`)."""
    return VERSION_SUFFIX.sub("", name)


def version_number(name: str) -> int:
    """N of a trailing -v<N>; 0 for a name without one."""
    match = VERSION_SUFFIX.search(name)
    return int(match.group(1)) if match else 0


def next_free_version(root: DataRoot, name: str) -> str:
    """`<family>-v<N+1>` where N is the highest version of the family seen in specs/ or datasets/."""
    base = family(name)
    pattern = re.compile(rf"^{re.escape(base)}-v(\d+)$")
    taken = set(root.spec_versions()) | {name}
    if root.datasets.is_dir():
        taken |= {p.name for p in root.datasets.iterdir()}
    highest = max([1] + [int(m.group(1)) for n in taken if (m := pattern.match(n))])
    return f"{base}-v{highest + 1}"


@dataclass(frozen=True)
class PlannedFile:
    """One image to copy: where it comes from and where it lands in the snapshot."""

    dest: str  # path inside the snapshot: img/<repeats>_<trigger>/<basename>
    src: Path
    bytes: int
    source_kind: str  # "batch" or "dataset"
    source_name: str
    source_path: str  # relative to the batch folder or to the earlier snapshot
    source_sha256: str | None  # known up front for dataset sources; a batch file's comes from the hash cache or copy
    origin: dict[str, str] | None  # origin_* of a dataset source's row; None: the batch file is the origin
    renamed_from: str | None = None
    size: ImageSize | None = None  # known up front for dataset sources (rows that record stored_width/height)
    folder: str = ""  # the snapshot folder it goes to: img/<repeats>_<trigger>, or reg/<repeats>_<class>
    class_tokens: str | None = None  # a regularisation image's class: its caption
    mask: str = "none"  # "none", "alpha", or "file": `mask_src` is copied beside the image
    mask_src: Path | None = None
    mask_source_path: str | None = None  # relative to the batch folder or to the earlier snapshot
    mask_sha256: str | None = None  # known for dataset sources

    @property
    def is_reg(self) -> bool:
        return self.class_tokens is not None


@dataclass
class SnapshotPlan:
    spec: DatasetSpec
    spec_path: Path
    sources: list[SourceRef]  # the spec's sources with batch patterns expanded to the batches they matched
    files: list[PlannedFile]
    problems: list[Problem] = field(default_factory=list)

    @property
    def version(self) -> str:
        return self.spec.name

    @property
    def parents(self) -> list[str]:
        """The version it was rebuilt from (if any), then the versions it takes images from."""
        found = [self.spec.rebuilt_from] if self.spec.rebuilt_from else []
        return found + [ref.dataset for ref in self.sources if ref.dataset and ref.dataset not in found]
