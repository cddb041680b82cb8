"""Training recipes: `data/recipes/<recipe>.yaml` in kohya's vocabulary, parsed and checked by a typed schema.

The fields are recipe_fields.py's (docs/fields.md lists every field with its range; `make docs`), the checks of
their combinations recipe_checks.py's. The recipe is one flat file, as kohya's arguments are; code reads it by
concern through its groups (`Recipe.network`, `.optimizer_settings`, `.schedule`, `.noise`, `.flow`,
`.augmentation`, `.automation`, `.buckets`, `.ema`, `.sampling`; recipe_groups.py).
`recipe_checks.fast_path_blockers` is the one answer to whether a run's steps can be captured as CUDA graphs.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import model_validator
from pydantic.dataclasses import dataclass

from lora_pipeline.core.datasets.buckets import BucketSettings
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_json
from lora_pipeline.core.models.families import model_family
from lora_pipeline.core.models.families.base import DDPM
from lora_pipeline.core.schema import CONFIG, hashed_values, validate
from lora_pipeline.core.training.recipe_checks import recipe_problems
from lora_pipeline.core.training.recipe_fields import RecipeFields
from lora_pipeline.core.training.recipe_groups import (
    AugmentationSettings,
    AutomationSettings,
    EmaSettings,
    FlowSettings,
    GroupView,
    NetworkSettings,
    NoiseSettings,
    OptimizerSettings,
    ScheduleSettings,
)
from lora_pipeline.core.yamlfile import load_yaml_mapping

if TYPE_CHECKING:  # sampling imports diffusers and torch; reading a recipe must not
    from lora_pipeline.core.models.sampling import SamplingSettings


@dataclass(frozen=True, config=CONFIG)
class Recipe(RecipeFields):
    """kohya-style training settings. `name` defaults to the file stem and must equal it; `min_bucket_reso` must
    not exceed `max_bucket_reso`."""

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        for problem in recipe_problems(self):
            raise ValueError(problem)
        return self

    @property
    def effective_batch_size(self) -> int:
        """Images per optimizer step (kohya's ss_total_batch_size on one device)."""
        return self.train_batch_size * self.gradient_accumulation_steps

    @property
    def kohya_lr_scheduler(self) -> str:
        """kohya's ss_lr_scheduler: relative-step Adafactor replaces the schedule with `adafactor:<lr>`."""
        if self.optimizer_settings.relative_step:
            return f"adafactor:{self.learning_rate}"
        return self.lr_scheduler

    # The fields by concern (recipe_groups.py); the optimizer's group is not `optimizer`, the field naming it.
    network = GroupView(NetworkSettings)
    optimizer_settings = GroupView(OptimizerSettings)
    schedule = GroupView(ScheduleSettings)
    noise = GroupView(NoiseSettings)
    augmentation = GroupView(AugmentationSettings)
    automation = GroupView(AutomationSettings)
    buckets = GroupView(BucketSettings)
    ema = GroupView(EmaSettings)

    @property
    def flow(self) -> FlowSettings:
        """The rectified-flow objective's settings (FLUX.1; core/training/step/flow.py)."""
        return FlowSettings(self.timestep_sampling, self.sigmoid_scale, self.discrete_flow_shift,
                            self.model_prediction_type, self.weighting_scheme, self.logit_mean, self.logit_std,
                            self.mode_scale, self.flux_guidance_scale)

    @property
    def sampling(self) -> SamplingSettings:
        """What the evaluation grid and the samples while training render from (core/models/sampling.py)."""
        from lora_pipeline.core.models.sampling import SamplingSettings

        return SamplingSettings(self.sample_prompts, self.sample_seed, self.resolution, self.sample_steps,
                                self.guidance_scale)

    def resolved(self) -> dict[str, Any]:
        """Every field with defaults filled in: MLflow params and the recipe hash use this."""
        return asdict(self)

    @property
    def sha256(self) -> str:
        """The hash of `resolved()` without what the fields' marks leave out (core/schema.py): fields added later
        (ADDED_LATER) count only when they differ from their default, so recipes without them, and the LoRA
        files trained from them, keep their hash; `train_on` says when to train, not how: it never counts."""
        values = self.resolved()
        if values["fast_path"] is False:  # unset and false train the same tensors, and hashed alike before
            values["fast_path"] = None
        if values["timestep_sampling"] == "uniform" and model_family(self.model_family).objective == DDPM:
            values["timestep_sampling"] = "sigma"  # a U-Net draws both alike (step/noise.py)
        return sha256_json(hashed_values(Recipe, values))


def parse_recipe(data: dict[str, Any], path: Path) -> Recipe:
    recipe = validate(Recipe, {"name": path.stem, **data}, path)
    if recipe.name != path.stem:
        raise UserError(f"name: '{recipe.name}' must equal the file stem '{path.stem}'", path)
    return recipe


def load_recipe(path: Path) -> Recipe:
    return parse_recipe(load_yaml_mapping(path), path)
