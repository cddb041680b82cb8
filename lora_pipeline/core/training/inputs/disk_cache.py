"""Entries of the caches kept under the data root's `.cache/` (latent_cache.py, text_cache.py): one safetensors
file per content key, checked on read, written whole.

An entry's header names its key and the sha256 of its payload (its tensors' bytes, in name order); a file whose
key, tensor names, shapes, dtype (float32) or payload do not match is a miss (encoded again and rewritten, with
one log line). Files are written to a temp name and renamed, so a killed run leaves no half entry. An entry is
read through the one no-follow reader (regular_files): a symbolic link or a FIFO in its place is a miss and is
never followed, and no entry is read past ENTRY_LIMIT.

    <folder>/<key[:2]>/<key>.safetensors
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from lora_pipeline.core.datasets.sources.regular_files import read_regular
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_bytes
from lora_pipeline.core.hashing import sha256_bytes

ENTRY_LIMIT = 1 << 30  # bytes of one entry (an SDXL latent is 0.5 MB, a FLUX.1 T5 embedding 8 MB)


def _header(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's bytes (an 8-byte little-endian length, then JSON)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}


@dataclass
class EntryStats:
    hits: int = 0
    misses: int = 0
    rejected: int = 0  # entries found but not trusted (counted in misses too)


def payload_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the tensors' bytes in name order (for one tensor: its bytes' sha256)."""
    return sha256_bytes(b"".join(tensors[name].contiguous().numpy().tobytes() for name in sorted(tensors)))


@dataclass
class EntryFiles:
    folder: Path
    label: str  # what the log line calls the cache: "latent cache"
    log: Callable[[str], None]
    stats: EntryStats

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str, shapes: Mapping[str, tuple[int, ...] | None],
            optional: frozenset[str] = frozenset()) -> dict[str, torch.Tensor] | None:
        """The stored tensors of `key` (those `shapes` names, but for `optional` ones that may be absent, shaped as
        it says; a None shape is not checked) if the file is there and checks out; None (a miss) otherwise."""
        path = self.path(key)
        if not os.path.lexists(path):
            self.stats.misses += 1
            return None
        try:
            data = read_regular(path, ENTRY_LIMIT, beneath=self.folder)
            header = _header(data)
            tensors = safetensors.torch.load(data)
            ok = (header.get("key") == key and shapes.keys() - optional <= tensors.keys() <= shapes.keys()
                  and all(shapes[n] is None or tuple(t.shape) == shapes[n] for n, t in tensors.items())
                  and all(t.dtype == torch.float32 for t in tensors.values())
                  and header.get("payload_sha256") == payload_sha256(tensors))
        except (OSError, ValueError, KeyError, AttributeError, RuntimeError, UserError, safetensors.SafetensorError):
            ok = False
        if not ok:
            self.stats.misses += 1
            self.stats.rejected += 1
            self.log(f"{self.label}: {path.name} does not match what it should hold; encoding it again")
            return None
        self.stats.hits += 1
        return tensors

    def put(self, key: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
        """Store float32 CPU copies of `tensors` under `key`, with `metadata` in the header beside the key and
        the payload's sha256."""
        stored = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}
        header = {"key": key, **metadata, "payload_sha256": payload_sha256(stored)}
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, safetensors.torch.save(stored, metadata=header))
