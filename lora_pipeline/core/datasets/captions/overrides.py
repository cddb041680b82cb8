"""Caption overrides: caption batches that a spec layers over its captions (`captions.overrides: batch:<id>`).

A caption batch is an ordinary source batch (`sources/<id>/`, `_READY`, registered, only ever read) of sidecars
laid out by each image's origin, the batch file it first entered the pipeline from (the manifest's
`origin_batch`/`origin_path`): `<origin batch>/<origin path with .txt>`. So the same caption batch fits a version
that takes the images from their batches and one that copies an earlier version. `lora-pipeline captions import`
writes such batches (core/datasets/captions/review_io.py); an image with a sidecar in one takes that caption
(`caption_source: sidecar:<id>/<origin batch>/<path>.txt`), every other image keeps its own. Later entries of
`overrides` win. A sidecar that names no image of the version is an `orphan_caption` warning.
"""

from __future__ import annotations

from pathlib import Path

from lora_pipeline.core.datasets.captions.tags import CAPTION_SUFFIX, caption_path
from lora_pipeline.core.datasets.problems import Problem, problem
from lora_pipeline.core.datasets.snapshot.manifest import ManifestRow
from lora_pipeline.core.datasets.sources.arrival import require_as_registered
from lora_pipeline.core.datasets.sources.batches import scan_batch
from lora_pipeline.core.datasets.spec import DatasetSpec
from lora_pipeline.core.paths import DataRoot

# What `_Collector.read_file` takes after the image: path, file (in its batch), scope, caption source, label.
SidecarRead = tuple[Path, str, str, str, str]


def override_batches(spec: DatasetSpec) -> list[str]:
    """The caption batches of `captions.overrides`, in order (later ones win)."""
    return [ref.partition(":")[2] for ref in spec.captions.overrides]


def origin_sidecar(row: ManifestRow) -> str:
    """Where an image's caption sits in a caption batch: `<origin batch>/<origin path with .txt>`."""
    batch = row.origin_batch or row.source_batch or row.source_dataset
    return f"{batch}/{caption_path(row.origin_path or row.source_path or row.path)}"


def override_reads(
    root: DataRoot, spec: DatasetSpec, images: list[ManifestRow]
) -> tuple[dict[str, SidecarRead], list[Problem]]:
    """{snapshot image: the override sidecar to read instead of its own caption}, and orphan warnings.

    Each caption batch must be ready and unchanged since its registration (else UserError naming it)."""
    by_sidecar = {origin_sidecar(row): row.path for row in images}
    reads: dict[str, SidecarRead] = {}
    problems: list[Problem] = []
    for batch in override_batches(spec):
        scan = scan_batch(root, batch)
        require_as_registered(root, scan)
        problems += scan.problems
        for f in scan.files:
            image = by_sidecar.get(f.path)
            if image is not None:
                source = f"sidecar:{batch}/{f.path}"
                reads[image] = (f.abs, f.path, f"batch:{batch}", source, f"override {batch}/{f.path}")
            else:
                what = "caption" if f.path.endswith(CAPTION_SUFFIX) else "file"
                message = f"{what} of a caption batch that names no image of this version (see captions.overrides)"
                problems.append(problem(f.path, "orphan_caption", "warning", message, f"batch:{batch}"))
    return reads, problems
