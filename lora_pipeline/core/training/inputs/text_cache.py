"""kohya's `cache_text_encoder_outputs_to_disk`: each caption's text conditioning kept under the data root and
reused by later runs and recipes (FLUX.1's T5-XXL is the expensive part of a caption's encoding).

An entry is what `encode_prompts` makes of one caption: the hidden states and, where the family has them, the
pooled embeddings (FLUX.1: T5's sequence and CLIP-L's pooled output), float32 copies of the encoders' outputs.
Its name is the sha256 of everything that output depends on: the caption, every file of the tokenizer and text
encoder folders (weights, configs, vocabularies), each tokenizer's token length (FLUX.1's
t5xxl_max_token_length), the family (how its conditioning is made of the encoders' outputs), the encoders'
dtype and device type, and a format number. Entries are checked on read and written whole (disk_cache.py).
Only frozen text encoders and captions that never change can be cached: the recipe refuses the option with
shuffled or dropped captions and with text encoders that train (as kohya does).

    <data root>/.cache/text/<key[:2]>/<key>.safetensors
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_pipeline.core.hashing import sha256_json
from lora_pipeline.core.models.loading import BaseModel, text_folders
from lora_pipeline.core.models.model_hash import folders_hash
from lora_pipeline.core.training.inputs.disk_cache import EntryFiles, EntryStats

FORMAT = 1
HIDDEN, POOLED = "hidden", "pooled"


@dataclass
class TextDiskCache:
    folder: Path  # <data root>/.cache/text
    encoders: dict[str, Any]  # what every entry depends on besides its caption (`for_model`)
    log: Callable[[str], None] = print
    stats: EntryStats = field(default_factory=EntryStats)

    def __post_init__(self) -> None:
        self.entries = EntryFiles(self.folder, "text cache", self.log, self.stats)

    @classmethod
    def for_model(cls, base: BaseModel, folder: Path, log: Callable[[str], None] = print) -> TextDiskCache:
        """The cache of `base`'s text encoders as they are now (their dtype and device)."""
        encoder = base.text_encoders[0]
        components = [name for pair in text_folders(base.architecture) for name in pair]
        files_sha256 = folders_hash(base.source, components, cache=folder.parent)  # folder: <data root>/.cache/text
        encoders = {"family": base.family, "files_sha256": files_sha256,
                    "token_lengths": list(base.token_lengths), "dtype": str(encoder.dtype),
                    "device": encoder.device.type}
        return cls(folder, encoders, log)

    def key(self, caption: str) -> str:
        return sha256_json({"format": FORMAT, **self.encoders, "caption": caption})

    def get(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The stored (hidden states, pooled or None) of one caption, each without a batch axis; None: a miss."""
        found = self.entries.get(self.key(caption), {HIDDEN: None, POOLED: None}, optional=frozenset({POOLED}))
        return None if found is None else (found[HIDDEN], found.get(POOLED))

    def put(self, caption: str, hidden: torch.Tensor, pooled: torch.Tensor | None) -> None:
        tensors = {HIDDEN: hidden, **({POOLED: pooled} if pooled is not None else {})}
        self.entries.put(self.key(caption), tensors, {"format": str(FORMAT)})
