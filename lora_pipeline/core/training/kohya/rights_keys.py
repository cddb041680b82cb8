"""The rights of a LoRA's training images in its header, read from the dataset version it was trained on.

`modelspec.license` names the terms of every batch the images came from (`owned`, `licensed (CC-BY-4.0; holder
...)`, `public-domain`, `unknown`); `ss_dataset_rights` counts the images by rights, as kohya's `ss_*` keys
count images by folder; `lora_pipeline.rights` holds each origin batch's terms and image count, as the snapshot
recorded them when it was built.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from lora_pipeline.core.datasets.checks.rights_check import image_rights, rights_counts
from lora_pipeline.core.datasets.snapshot.manifest import IMAGE_KINDS, read_manifest, read_snapshot_info
from lora_pipeline.core.datasets.sources.retired import origin_of
from lora_pipeline.core.datasets.sources.rights import UNKNOWN, BatchRights

RIGHTS_KEY = "lora_pipeline.rights"


def rights_metadata(snapshot_dir: Path) -> dict[str, str]:
    """The header keys for the images of the version in `snapshot_dir` (all strings)."""
    rows = read_manifest(snapshot_dir)
    terms = read_snapshot_info(snapshot_dir).rights
    images = Counter(origin_of(r) or "" for r in rows if r.kind in IMAGE_KINDS)
    by_batch = {
        batch: {**terms.get(batch, BatchRights(rights=UNKNOWN)).to_json_dict(), "images": n}
        for batch, n in sorted(images.items())
    }
    labels = sorted({terms[b].label if b in terms else UNKNOWN for b in images})
    return {
        "modelspec.license": "; ".join(labels),
        "ss_dataset_rights": json.dumps(rights_counts(image_rights(rows)), sort_keys=True),
        RIGHTS_KEY: json.dumps(by_batch, sort_keys=True, ensure_ascii=False),
    }
