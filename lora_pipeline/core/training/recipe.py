"""Training recipes: `data/recipes/<recipe>.yaml` in kohya's vocabulary (DESIGN.md, "Recipes")."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_json
from lora_pipeline.core.yamlfile import load_yaml_mapping, reject_unknown

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
OPTIMIZERS = ("DAdaptAdamW", "AdamW", "AdamW8bit", "Prodigy")
SCHEDULERS = ("constant", "cosine", "linear", "constant_with_warmup")
PRECISIONS = ("no", "fp16", "bf16")
FAMILIES = ("sd15", "sdxl")


@dataclass(frozen=True)
class Recipe:
    name: str
    base_model: str = "tiny-sd"
    model_family: Literal["sd15", "sdxl"] = "sd15"
    resolution: int = 512
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    epochs: int = 20
    save_every_n_epochs: int = 1
    train_batch_size: int = 1
    network_dim: int = 32
    network_alpha: float = 16.0
    network_train_unet_only: bool = True
    optimizer: str = "DAdaptAdamW"
    learning_rate: float = 1.0
    weight_decay: float = 0.01
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    shuffle_caption: bool = True
    keep_tokens: int = 1
    caption_separator: str = ","
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    seed: int = 42
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    sample_seed: int = 1234
    guidance_scale: float = 7.0
    eval_weights: tuple[float, ...] = (0.6, 0.8, 1.0, 1.2)
    eval_max_epochs: int = 0  # 0 = every saved epoch; N = an even subset of N epochs
    validation_split: float = 0.1

    def resolved(self) -> dict[str, Any]:
        """Every field with defaults filled in: MLflow params and the recipe hash use this."""
        return asdict(self)

    @property
    def sha256(self) -> str:
        return sha256_json(self.resolved())


RECIPE_FIELDS = {f.name for f in fields(Recipe)}


def _check(condition: bool, message: str, path: Path) -> None:
    if not condition:
        raise UserError(message, path)


def parse_recipe(data: dict[str, Any], path: Path) -> Recipe:
    reject_unknown(data, RECIPE_FIELDS, path)
    name = str(data.get("name", path.stem))
    _check(name == path.stem, f"name '{name}' must equal the file stem '{path.stem}'", path)
    _check(bool(NAME_RE.match(name)), f"name '{name}' may only use letters, digits, '.', '_' and '-'", path)
    values = dict(data, name=name)
    for key in ("sample_prompts", "eval_weights"):
        if key in values:
            _check(isinstance(values[key], list), f"{key} must be a list", path)
            values[key] = tuple(values[key])
    defaults = Recipe(name=name)
    for f in fields(Recipe):
        if f.name not in values or values[f.name] is None:
            continue
        default = getattr(defaults, f.name)
        value = values[f.name]
        try:
            if isinstance(default, bool):
                _check(isinstance(value, bool), f"{f.name} must be true or false", path)
            elif isinstance(default, int):
                _check(not isinstance(value, bool), f"{f.name} must be an integer", path)
                values[f.name] = int(value)
                _check(values[f.name] == value, f"{f.name} must be an integer", path)
            elif isinstance(default, float) or f.name == "min_snr_gamma":
                _check(not isinstance(value, bool), f"{f.name} must be a number", path)
                values[f.name] = float(value)
            elif f.name == "eval_weights":
                values[f.name] = tuple(float(v) for v in value)
            elif f.name == "sample_prompts":
                values[f.name] = tuple(str(v) for v in value)
        except (TypeError, ValueError):
            raise UserError(f"{f.name} has the wrong type: {value!r}", path) from None
    recipe = Recipe(**values)
    _check(recipe.model_family in FAMILIES, f"model_family must be one of {', '.join(FAMILIES)}", path)
    _check(recipe.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}", path)
    _check(recipe.lr_scheduler in SCHEDULERS, f"lr_scheduler must be one of {', '.join(SCHEDULERS)}", path)
    _check(recipe.mixed_precision in PRECISIONS, f"mixed_precision must be one of {', '.join(PRECISIONS)}", path)
    _check(recipe.epochs >= 1, "epochs must be at least 1", path)
    _check(recipe.save_every_n_epochs >= 1, "save_every_n_epochs must be at least 1", path)
    _check(recipe.train_batch_size >= 1, "train_batch_size must be at least 1", path)
    _check(recipe.network_dim >= 1, "network_dim must be at least 1", path)
    _check(recipe.network_alpha > 0, "network_alpha must be positive", path)
    _check(recipe.resolution % 8 == 0 and recipe.resolution >= 8, "resolution must be a multiple of 8", path)
    _check(recipe.keep_tokens >= 0, "keep_tokens must be 0 or more", path)
    _check(0.0 <= recipe.validation_split < 1.0, "validation_split must be in [0, 1)", path)
    _check(recipe.network_train_unet_only, "only network_train_unet_only: true is supported", path)
    return recipe


def load_recipe(path: Path) -> Recipe:
    return parse_recipe(load_yaml_mapping(path), path)
