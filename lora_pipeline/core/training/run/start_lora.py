"""Starting a run from an existing LoRA (`from_lora`, kohya's --network_weights).

`from_lora` names a kohya-format safetensors file (absolute, or relative to the data root) or a LoRA of this
pipeline as `<version>/<recipe>/e<NNN>` (the epoch file under `loras/<version>/<recipe>/`). Before the first step
the run's freshly built adapters take the file's weights, after three checks, each a one-line UserError naming the
file: its family (from the header: this pipeline's recipe, else kohya's ss_base_model_version) is the recipe's,
its modules (kohya keys, with DoRA's dora_scale) are those the recipe trains, and each module's rank and alpha are
the recipe's. Unlike kohya, which loads what matches and warns about the rest (`load_state_dict(strict=False)`),
a file that does not fit is refused: a silently partial start is a different LoRA than the one named. After
loading, the adapters written back in kohya's form must give the file's tensors exactly.

A resumed run continues from its resume state, not the file; the file's sha256 is part of what a state must match
(trainer.py), so a changed starting file starts the run over. The header records where the run started
(`lora_pipeline.from_lora`, its sha256 and kohya's argument name `ss_network_weights`; current sd-scripts does
not write that key itself), and `lora-pipeline provenance` traces the starting file's own chain.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_file
from lora_pipeline.core.models.families import model_family
from lora_pipeline.core.models.flux_names import TRANSFORMER, flux_from_kohya
from lora_pipeline.core.models.kohya_names import UNET_PREFIX
from lora_pipeline.core.models.lora_layout import per_module_keys
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.training.kohya.lora_file import read_lora_metadata
from lora_pipeline.core.training.kohya.network import (
    adapter_modules,
    kohya_state_dict,
    lora_text_encoders,
    text_encoder_modules,
)
from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline.core.training.run.checkpoint import epoch_file_name

if TYPE_CHECKING:
    from lora_pipeline.core.models.loading import BaseModel

REFERENCE = re.compile(r"([^/\\]+)/([^/\\]+)/e(\d{1,6})")  # <version>/<recipe>/e<NNN>
FROM_LORA, FROM_LORA_SHA256 = "lora_pipeline.from_lora", "lora_pipeline.from_lora_sha256"
DOWN, UP, ALPHA, DORA = ".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale"


@dataclass(frozen=True)
class StartLora:
    """The LoRA a run starts from: its file, how the header names it, its sha256."""

    path: Path
    named: str  # relative to the data root when inside it, else absolute
    sha256: str

    def metadata(self) -> dict[str, str]:
        """The header keys of a run that started from this file."""
        return {FROM_LORA: self.named, FROM_LORA_SHA256: self.sha256, "ss_network_weights": self.named}


def start_path(root: DataRoot, reference: str) -> Path:
    """The file `reference` (a `from_lora` value or a header's `lora_pipeline.from_lora`) names."""
    pipeline = REFERENCE.fullmatch(reference)
    if pipeline is not None and not reference.endswith(".safetensors"):
        version, recipe, epoch = pipeline.groups()
        return root.loras(version, recipe) / epoch_file_name(version, recipe, int(epoch))
    path = Path(reference).expanduser()
    return path if path.is_absolute() else root.root / path


def resolve_start(root: DataRoot, recipe: Recipe) -> StartLora | None:
    """The recipe's `from_lora` file, its family checked against the recipe's (None without from_lora)."""
    if recipe.from_lora is None:
        return None
    path = start_path(root, recipe.from_lora)
    if not path.is_file():
        raise UserError(f"from_lora: {recipe.from_lora} names {path}, which does not exist",
                        root.recipe_file(recipe.name))
    meta = read_lora_metadata(path)
    family = model_family(recipe.model_family)
    trained = json.loads(meta.get("lora_pipeline.recipe_resolved", "{}")).get("model_family")
    if trained is not None and trained != recipe.model_family:
        raise UserError(f"from_lora: a {trained} LoRA, but the recipe trains {recipe.model_family}", path)
    version = meta.get("ss_base_model_version")
    if trained is None and version is not None and version != family.kohya_base_model_version:
        raise UserError(f"from_lora: a LoRA of {version} (ss_base_model_version), but the recipe trains "
                        f"{recipe.model_family} ({family.kohya_base_model_version})", path)
    inside = path.absolute().is_relative_to(root.root.absolute())
    named = path.absolute().relative_to(root.root.absolute()).as_posix() if inside else str(path.absolute())
    return StartLora(path, named, sha256_file(path))


def _modules(keys: set[str]) -> dict[str, set[str]]:
    """{kohya module: its key suffixes}."""
    found: dict[str, set[str]] = {}
    for key in keys:
        module, _, suffix = key.partition(".")
        found.setdefault(module, set()).add("." + suffix)
    return found


def _mismatch(held: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor], recipe: Recipe) -> str | None:
    """How the file's tensors differ from those of the recipe's network, in a few words; None: they fit."""
    mine, theirs = _modules(set(wanted)), _modules(set(held))
    missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    if missing or extra:
        parts = [f"{len(missing)} of the recipe's {len(mine)} modules missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(extra)} modules the recipe does not train (e.g. {extra[0]})"] if extra else []
        return "its modules are not the recipe's: " + ", ".join(parts)
    for module in sorted(mine):
        if mine[module] != theirs[module]:
            dora = "use_dora differs: " if DORA in mine[module] ^ theirs[module] else ""
            return f"{dora}module {module} holds {sorted(theirs[module])}, the recipe's {sorted(mine[module])}"
        down, alpha = module + DOWN, module + ALPHA
        if held[down].shape[0] != wanted[down].shape[0]:
            return (f"rank {held[down].shape[0]} where the recipe trains rank {wanted[down].shape[0]} "
                    f"(network_dim {recipe.network_dim}; module {module})")
        if not math.isclose(float(held[alpha]), float(wanted[alpha]), rel_tol=1e-6):
            return f"alpha {float(held[alpha]):g} where the recipe's is {float(wanted[alpha]):g} (module {module})"
        for key in (module + suffix for suffix in sorted(mine[module])):
            if held[key].shape != wanted[key].shape:
                return f"{key} is shaped {tuple(held[key].shape)}, the recipe's {tuple(wanted[key].shape)}"
    return None


def _set(module: Any, adapter: str, down: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None) -> None:
    module.lora_A[adapter].weight.copy_(down)
    module.lora_B[adapter].weight.copy_(up)
    if scale is not None:
        magnitude = module.lora_magnitude_vector[adapter].weight
        magnitude.copy_(scale.reshape(magnitude.shape))


def _load(base: BaseModel, family: str, held: dict[str, torch.Tensor], encoders: list[Any], adapter: str) -> None:
    """Set the adapters to the file's tensors (which fit: `_mismatch`), the inverse of `kohya_state_dict`."""
    architecture = model_family(family)
    unet = base.denoiser
    modules = dict(adapter_modules(unet, adapter))
    if architecture.kohya_layout == "per_module":
        keyed = {key: modules[name] for name, key in per_module_keys(architecture, unet, list(modules)).items()}
    else:  # FLUX.1's fused Linears: split back into the diffusers modules
        keyed = {}
        factors = flux_from_kohya({k: v for k, v in held.items() if k.startswith(UNET_PREFIX)})
        for name, part in factors.items():
            _set(modules[name.removeprefix(TRANSFORMER + ".")], adapter, part.down, part.up, None)
    keyed.update(text_encoder_modules(family, encoders, adapter))
    for key, module in keyed.items():
        _set(module, adapter, held[key + DOWN], held[key + UP], held.get(key + DORA))


def load_start_lora(base: BaseModel, recipe: Recipe, start: StartLora, adapter: str = "default") -> None:
    """Check the file against the recipe's freshly built network (one-line UserError naming the file), then load
    it into the adapters (see the module docstring)."""
    import safetensors.torch

    encoders = None if recipe.network_train_unet_only else lora_text_encoders(base, recipe.train_t5xxl)
    wanted = kohya_state_dict(base.denoiser, recipe.model_family, text_encoders=encoders)
    held = safetensors.torch.load_file(str(start.path))
    if (problem := _mismatch(held, wanted, recipe)) is not None:
        raise UserError(f"from_lora: {problem}", start.path)
    with torch.no_grad():
        _load(base, recipe.model_family, {k: v.float() for k, v in held.items()}, encoders or [], adapter)
    written = kohya_state_dict(base.denoiser, recipe.model_family, text_encoders=encoders)
    if any(not torch.equal(written[k].float(), held[k].float()) for k in held):
        raise UserError("from_lora: its weights could not be loaded exactly into the recipe's network", start.path)
