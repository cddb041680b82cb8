"""kohya's `cache_latents_to_disk`: VAE posteriors kept under the data root, shared by runs and recipes.

An entry is what the VAE made of one image seen one way: the posterior's parameters (mean and log-variance,
float32), so every run still draws its own latent sample from its seed, exactly as without the disk cache.
Its name is content-addressed: the sha256 of the image's sha256, the VAE's weights hash and dtype, the bucket,
the resized size, the crop and the flip (and a format number). A changed image, VAE or bucket is another name,
so an entry is never trusted across a changed VAE; runs and recipes of the same base model at the same
buckets share entries.

Entries are checked on read and written whole (disk_cache.py).

    <data root>/.cache/latents/<key[:2]>/<key>.safetensors
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_pipeline.core.hashing import sha256_json
from lora_pipeline.core.training.inputs.disk_cache import EntryFiles, EntryStats

FORMAT = 1
TENSOR = "posterior"


@dataclass
class CacheStats(EntryStats):
    vae_encodes: int = 0  # every VAE encode of the run, with or without the disk cache

    def as_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "rejected": self.rejected, "vae_encodes": self.vae_encodes}


def entry_key(image_sha256: str, vae_hash: str, bucket: tuple[int, int], resized: tuple[int, int],
              crop_top_left: tuple[int, int], flip: bool, vae_dtype: str = "float32") -> str:
    """The entry's name; the VAE's dtype counts where it is not float32 (the entries written before bf16
    encoding keep their names)."""
    return sha256_json({"format": FORMAT, "image_sha256": image_sha256, "vae_hash": vae_hash,
                        "bucket": list(bucket), "resized": list(resized), "crop_top_left": list(crop_top_left),
                        "flip": flip, **({"vae_dtype": vae_dtype} if vae_dtype != "float32" else {})})


@dataclass
class LatentDiskCache:
    folder: Path  # <data root>/.cache/latents
    vae_hash: str
    log: Callable[[str], None] = print
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self.entries = EntryFiles(self.folder, "latent cache", self.log, self.stats)

    def path(self, key: str) -> Path:
        return self.entries.path(key)

    def get(self, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The stored posterior of `key` if its file is there and checks out; None (a miss) otherwise."""
        found = self.entries.get(key, {TENSOR: shape})
        return None if found is None else found[TENSOR]

    def put(self, key: str, posterior: torch.Tensor) -> None:
        self.entries.put(key, {TENSOR: posterior}, {"vae_hash": self.vae_hash, "format": str(FORMAT)})
