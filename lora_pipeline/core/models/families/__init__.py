"""Model families: everything that differs between SD 1.5, SDXL (and the families to come) in one module each.

Loading, text conditioning, LoRA key names, the sampling pipeline and the LoRA file's metadata ask the family
(`model_family(name)`) instead of branching on its name; adding a family is one module here and its entry in
FAMILIES.
"""

from __future__ import annotations

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.models.families.base import ModelFamily
from lora_pipeline.core.models.families.flux1 import FLUX1
from lora_pipeline.core.models.families.sd15 import SD15
from lora_pipeline.core.models.families.sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SD15, SDXL, FLUX1)}

__all__ = ["FAMILIES", "ModelFamily", "model_family"]


def model_family(name: str) -> ModelFamily:
    """The family a recipe's `model_family` names; one line naming the known ones otherwise."""
    if name not in FAMILIES:
        raise UserError(f"model_family must be {', '.join(list(FAMILIES)[:-1])} or {list(FAMILIES)[-1]}, not '{name}'")
    return FAMILIES[name]
