"""What provenance reads from disk, each read confined: a LoRA header is untrusted input, and so is everything
under a handed-off batch.

Files of the data root are read through the one no-follow, regular-files-only reader (regular_files), beneath
the folder they belong to (a batch, a dataset version): a caption replaced by a link to a file outside the root is
a finding, and its target is never read nor printed. The base model a header names is hashed only inside the data
root, its model folders (`models/<name>`, links to a user's model folders included, and the folder the LoRA's
recipe names as its `base_model`) and the Hugging Face cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_pipeline.core.datasets.sources.regular_files import (
    CAPTION_LIMIT,
    FileTooLarge,
    NotRegularFile,
    read_regular,
    sha256_regular,
)
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.training.recipe import load_recipe

_NOT_READ = {
    "symlink_not_followed": "is a symbolic link, not followed",
    "not_a_regular_file": "is not a regular file",
    "outside_the_folder": "lies outside its folder",
}


def rehash(path: Path, beneath: Path) -> tuple[str | None, str | None]:
    """(sha256, None) of a regular file of `beneath`; (None, why) when it is missing or cannot be read as one."""
    try:
        return sha256_regular(path, beneath=beneath), None
    except (FileNotFoundError, NotADirectoryError):
        return None, "no longer exists"
    except NotRegularFile as exc:
        return None, f"{_NOT_READ[exc.code]}; nothing was read from it"


def caption_text(path: Path, beneath: Path) -> tuple[str | None, str | None]:
    """(text, None) of a snapshot caption file (one line, stripped; undecodable bytes replaced), or (None, why)."""
    try:
        data = read_regular(path, CAPTION_LIMIT, beneath=beneath)
    except (FileNotFoundError, NotADirectoryError):
        return None, None  # a missing caption file is the manifest check's finding
    except NotRegularFile as exc:
        return None, f"{_NOT_READ[exc.code]}; its text was not read"
    except FileTooLarge:
        return None, f"is larger than {CAPTION_LIMIT:,} bytes; its text was not read"
    return data.decode("utf-8", errors="replace").strip(), None


def model_folders(root: DataRoot, recipe_file: Path) -> list[Path]:
    """Where a header's base model may be read: the data root, each `models/<name>` (followed: a user links their
    model folders there), the folder the recipe file names as its `base_model` (when it is a path) and the
    Hugging Face hub cache."""
    from huggingface_hub.constants import HF_HUB_CACHE

    folders = [root.root, Path(HF_HUB_CACHE)]
    if root.models.is_dir():
        folders += [Path(os.path.realpath(entry)) for entry in sorted(root.models.iterdir())]
    try:
        configured = load_recipe(recipe_file).base_model if recipe_file.is_file() else ""
    except UserError:
        configured = ""  # provenance reports a recipe that no longer loads
    if configured and Path(configured).expanduser().is_absolute():
        folders.append(Path(configured).expanduser())
    return folders
