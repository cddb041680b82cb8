"""`base_model_hash`: which base model a LoRA was trained on, without loading it (no torch/diffusers import).

Kept apart from models.py so that `lora-pipeline provenance` stays quick to start.

The source may come from an untrusted LoRA header (provenance), so every read here is bounded: a shard index is
read up to INDEX_LIMIT, a shard must be a plain file name inside the weights folder, and every file is opened
through the one no-follow, regular-files-only reader (a FIFO or `/dev/zero` is refused, never read). Given
`within` (the data root and the model folders), each file must also resolve inside one of those folders: an
index listing `/etc/shadow`, or a shard linked out of them, is refused before it is opened.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from lora_pipeline.core.datasets.sources.regular_files import read_regular
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_bytes
from lora_pipeline.core.models.model_hash_cache import file_sha256

UNET_WEIGHTS = "diffusion_pytorch_model"
INDEX_LIMIT = 16 << 20  # bytes of a shard index (a real one is a few hundred KB)


def _confined(path: Path, within: Sequence[Path]) -> Path:
    """`path` with every link resolved, refused (UserError) unless it lies inside one of `within` (none: any)."""
    real = Path(os.path.realpath(path))
    if within and not any(real.is_relative_to(os.path.realpath(folder)) for folder in within):
        raise UserError("lies outside the data root and the model folders; not read", path)
    return real


def _hash_file(path: Path, within: Sequence[Path], cache: Path | None) -> str:
    """The file's sha256 (through the hash cache when given: it reads regular files only, no link followed)."""
    return file_sha256(_confined(path, within), cache)


def _shard(unet_dir: Path, name: object, index: Path) -> Path:
    """A shard the index names: a plain file name inside the weights folder, nothing else."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UserError(f"names the shard {name!r}, not a file name inside {unet_dir.name}/; not read", index)
    return unet_dir / name


def _model_folder(source: str, component: str = "unet") -> Path:
    """A diffusers folder, or a hub id's snapshot in the local cache (never downloaded here)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or source.startswith((".", "~")):
        raise UserError("base model folder not found", source)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, allow_patterns=[f"{component}/*"], local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        raise UserError(f"base model '{source}' is not a local folder nor in the Hugging Face cache") from None


def _unet_weight_files(unet_dir: Path, within: Sequence[Path] = ()) -> list[Path]:
    """The files diffusers loads a component (U-Net, VAE) from: single or sharded, safetensors before .bin."""
    for ext in ("safetensors", "bin"):
        single = unet_dir / f"{UNET_WEIGHTS}.{ext}"
        if single.is_file():
            return [single]
        index = unet_dir / f"{UNET_WEIGHTS}.{ext}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(read_regular(_confined(index, within), INDEX_LIMIT))["weight_map"]
                names = set(weight_map.values())
            except (ValueError, KeyError, TypeError, AttributeError):
                raise UserError("not a shard index (no weight_map of file names)", index) from None
            return [_shard(unet_dir, name, index) for name in sorted(names, key=str)]
    raise UserError(f"no {'U-Net' if unet_dir.name == 'unet' else unet_dir.name.upper()} weights found", unet_dir)


def base_model_hash(source: str, within: Sequence[Path] = (), *, cache: Path | None = None) -> str:
    """sha256 identifying the base model's denoiser (the part its LoRA patches): the U-Net, or FLUX.1's
    transformer in a model without `unet/`.

    One weights file: the file's sha256 (what A1111 calls a model's new hash). Sharded weights: sha256 over
    "name  sha256" lines of the shards, in name order. Stable for a given model folder. `within`: the folders
    every file read must lie in (see the module docstring). `cache`: a data root's `.cache` folder, where each
    file's sha256 is kept while the file is unchanged (model_hash_cache.py).
    """
    folder = _model_folder(source, "unet")
    flux = not (folder / "unet").is_dir() and (folder / "transformer").is_dir()
    return weights_hash(source, "transformer" if flux else "unet", within, cache=cache)  # neither: "no U-Net weights"


def weights_hash(source: str, component: str, within: Sequence[Path] = (), *, cache: Path | None = None) -> str:
    """`base_model_hash`'s rule for any weights folder of the model (`unet`, `vae`)."""
    files = _unet_weight_files(_model_folder(source, component) / component, within)
    if len(files) == 1:
        return _hash_file(files[0], within, cache)
    lines = "".join(f"{f.name}  {_hash_file(f, within, cache)}\n" for f in files)
    return sha256_bytes(lines.encode())


def folders_hash(source: str, components: list[str], *, cache: Path | None = None) -> str:
    """sha256 over "component/path  sha256" lines of every file of the model's `components` folders (weights,
    configs, tokenizer files), in path order: what a cached output of those components depends on."""
    lines = []
    for component in components:
        folder = _model_folder(source, component) / component
        if not folder.is_dir():
            raise UserError(f"no {component} folder found", folder.parent)
        lines += [f"{component}/{f.relative_to(folder).as_posix()}  {_hash_file(f, (), cache)}\n"
                  for f in sorted(folder.rglob("*")) if f.is_file()]
    return sha256_bytes("".join(lines).encode())
