"""`base_model_hash`: which base model a LoRA was trained on, without loading it (no torch/diffusers import).

Kept apart from models.py so that `lora-pipeline provenance` stays quick to start.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_bytes
from lora_pipeline.core.models.model_hash_cache import file_sha256

UNET_WEIGHTS = "diffusion_pytorch_model"


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


def _unet_weight_files(unet_dir: Path) -> list[Path]:
    """The files diffusers loads a component (U-Net, VAE) from: single or sharded, safetensors before .bin."""
    for ext in ("safetensors", "bin"):
        single = unet_dir / f"{UNET_WEIGHTS}.{ext}"
        if single.is_file():
            return [single]
        index = unet_dir / f"{UNET_WEIGHTS}.{ext}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            return [unet_dir / s for s in shards]
    raise UserError(f"no {'U-Net' if unet_dir.name == 'unet' else unet_dir.name.upper()} weights found", unet_dir)


def base_model_hash(source: str, *, cache: Path | None = None) -> str:
    """sha256 identifying the base model's denoiser (the part its LoRA patches): the U-Net, or FLUX.1's
    transformer in a model without `unet/`.

    One weights file: the file's sha256 (what A1111 calls a model's new hash). Sharded weights: sha256 over
    "name  sha256" lines of the shards, in name order. Stable for a given model folder. `cache`: a data root's
    `.cache` folder, where each file's sha256 is kept while the file is unchanged (model_hash_cache.py).
    """
    folder = _model_folder(source, "unet")
    flux = not (folder / "unet").is_dir() and (folder / "transformer").is_dir()
    return weights_hash(source, "transformer" if flux else "unet", cache=cache)  # neither: "no U-Net weights found"


def weights_hash(source: str, component: str, *, cache: Path | None = None) -> str:
    """`base_model_hash`'s rule for any weights folder of the model (`unet`, `vae`)."""
    files = _unet_weight_files(_model_folder(source, component) / component)
    if len(files) == 1:
        return file_sha256(files[0], cache)
    lines = "".join(f"{f.name}  {file_sha256(f, cache)}\n" for f in files)
    return sha256_bytes(lines.encode())


def folders_hash(source: str, components: list[str], *, cache: Path | None = None) -> str:
    """sha256 over "component/path  sha256" lines of every file of the model's `components` folders (weights,
    configs, tokenizer files), in path order: what a cached output of those components depends on."""
    lines = []
    for component in components:
        folder = _model_folder(source, component) / component
        if not folder.is_dir():
            raise UserError(f"no {component} folder found", folder.parent)
        lines += [f"{component}/{f.relative_to(folder).as_posix()}  {file_sha256(f, cache)}\n"
                  for f in sorted(folder.rglob("*")) if f.is_file()]
    return sha256_bytes("".join(lines).encode())
