"""kohya's `cache_latents_to_disk`: VAE posteriors kept under the data root, shared by runs and recipes.

An entry is what the VAE made of one image seen one way: the posterior's parameters (mean and log-variance,
float32), so every run still draws its own latent sample from its seed, exactly as without the disk cache.
Its name is content-addressed: the sha256 of the image's sha256, the VAE's weights hash, the bucket, the
resized size, the crop and the flip (and a format number). A changed image, VAE or bucket is another name,
so an entry is never trusted across a changed VAE; runs and recipes of the same base model at the same
buckets share entries.

Entries are checked on read: the header must name the same key and the payload's sha256 and shape must
match; anything else (a damaged or foreign file) is a miss that is encoded again and rewritten, with one
log line. Files are written to a temp name and renamed, so a killed run leaves no half entry.

    <data root>/.cache/latents/<key[:2]>/<key>.safetensors
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from lora_pipeline.core.fileio import atomic_write_bytes
from lora_pipeline.core.hashing import sha256_bytes, sha256_json

FORMAT = 1
TENSOR = "posterior"


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    rejected: int = 0  # entries found but not trusted (counted in misses too)
    vae_encodes: int = 0  # every VAE encode of the run, with or without the disk cache

    def as_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "rejected": self.rejected, "vae_encodes": self.vae_encodes}


def entry_key(image_sha256: str, vae_hash: str, bucket: tuple[int, int], resized: tuple[int, int],
              crop_top_left: tuple[int, int], flip: bool) -> str:
    return sha256_json({"format": FORMAT, "image_sha256": image_sha256, "vae_hash": vae_hash,
                        "bucket": list(bucket), "resized": list(resized), "crop_top_left": list(crop_top_left),
                        "flip": flip})


@dataclass
class LatentDiskCache:
    folder: Path  # <data root>/.cache/latents
    vae_hash: str
    log: Callable[[str], None] = print
    stats: CacheStats = field(default_factory=CacheStats)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The stored posterior of `key` if its file is there and checks out; None (a miss) otherwise."""
        path = self.path(key)
        if not path.is_file():
            self.stats.misses += 1
            return None
        try:
            data = path.read_bytes()
            with safetensors.safe_open(str(path), "pt") as f:  # header only; the tensor comes from `data`
                header = f.metadata() or {}
            tensor = safetensors.torch.load(data)[TENSOR]
            payload = tensor.contiguous().numpy().tobytes()
            ok = (header.get("key") == key and tuple(tensor.shape) == shape and tensor.dtype == torch.float32
                  and header.get("payload_sha256") == sha256_bytes(payload))
        except (OSError, ValueError, KeyError, RuntimeError, safetensors.SafetensorError):
            ok = False
        if not ok:
            self.stats.misses += 1
            self.stats.rejected += 1
            self.log(f"latent cache: {path.name} does not match what it should hold; encoding it again")
            return None
        self.stats.hits += 1
        return tensor

    def put(self, key: str, posterior: torch.Tensor) -> None:
        tensor = posterior.detach().to("cpu", torch.float32).contiguous()
        metadata = {"key": key, "vae_hash": self.vae_hash, "format": str(FORMAT),
                    "payload_sha256": sha256_bytes(tensor.numpy().tobytes())}
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, safetensors.torch.save({TENSOR: tensor}, metadata=metadata))
