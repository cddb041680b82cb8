"""The model-family seam (core/models/families/): what each family says, and that nothing outside the models
package branches on a family's name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.models.families import FAMILIES, model_family
from lora_pipeline.core.models.loading import load_base_model

PACKAGE = Path(__file__).resolve().parents[1] / "lora_pipeline"
# The code that must ask the family rather than name it: training, evaluation, provenance and the Dagster layer.
ASKS_THE_FAMILY = ["core/training", "core/evaluation", "core/lineage", "defs"]


def family_branches(source: str, names: set[str]) -> list[int]:
    """Lines of `source` that branch on a family name: a comparison with one (`== "sdxl"`, `in ("sd15", ...)`),
    a dict keyed by one, or a subscript by one (`TABLE["sd15"]`)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            constants = [c for o in operands for c in ast.walk(o) if isinstance(c, ast.Constant)]
        elif isinstance(node, ast.Dict):
            constants = [k for k in node.keys if isinstance(k, ast.Constant)]
        elif isinstance(node, ast.Subscript):
            constants = [node.slice] if isinstance(node.slice, ast.Constant) else []
        elif isinstance(node, ast.match_case):
            constants = [c for c in ast.walk(node.pattern) if isinstance(c, ast.Constant)]
        else:
            continue
        if any(c.value in names for c in constants):
            lines.append(node.lineno)
    return lines


def test_the_branch_finder_finds_each_kind_of_branch():
    planted = ('if recipe.model_family == "sdxl":\n    x = 1\n'
               'y = {"sd15": 1}\nz = TABLE["sdxl"]\nw = name in ("sd15", "other")\nv = "sd15"\n')
    assert family_branches(planted, {"sd15", "sdxl"}) == [1, 3, 4, 5]


def test_training_evaluation_provenance_and_defs_ask_the_family():
    found = {f"{path.relative_to(PACKAGE)}:{line}"
             for folder in ASKS_THE_FAMILY for path in sorted((PACKAGE / folder).rglob("*.py"))
             for line in family_branches(path.read_text(encoding="utf-8"), set(FAMILIES))}
    assert found == set()


def test_an_unknown_family_is_one_line_naming_the_known_ones():
    with pytest.raises(UserError, match="model_family must be sd15, sdxl or flux1, not 'flux9'"):
        model_family("flux9")


@pytest.mark.parametrize(("name", "encoders", "prefixes"), [
    ("sd15", ("CLIPTextModel",), ("lora_te_",)),
    ("sdxl", ("CLIPTextModel", "CLIPTextModelWithProjection"), ("lora_te1_", "lora_te2_")),
])
def test_each_family_names_its_parts_as_kohya_and_diffusers_do(name, encoders, prefixes):
    family = model_family(name)
    assert (family.text_encoders, family.text_prefixes) == (encoders, prefixes)
    assert family.micro_conditioning == (name == "sdxl")


def test_the_families_key_names_on_the_tiny_models(tmp_path):
    sd = load_base_model(tmp_path, "tiny-sd", "sd15")
    sdxl = load_base_model(tmp_path, "tiny-sdxl", "sdxl")
    name = "down_blocks.1.attentions.0.proj_in"
    assert sd.architecture.kohya_module_namer(sd.unet)(name) == name  # SD 1.x: the diffusers path itself
    assert sdxl.architecture.kohya_module_namer(sdxl.unet)(name) == "input_blocks.4.1.proj_in"  # sgm
    assert sd.architecture.is_own_denoiser(sd.unet.config) and not sdxl.architecture.is_own_denoiser(sd.unet.config)


def test_the_families_say_how_their_pipeline_samples(tmp_path):
    sd = load_base_model(tmp_path, "tiny-sd", "sd15")
    dev = load_base_model(tmp_path, "tiny-flux", "flux1", t5_max_length=64)
    schnell = load_base_model(tmp_path, "tiny-flux-schnell", "flux1")
    assert sd.pipeline_call_options == {} and sd.architecture.guidance_note(sd.unet, 7.0) == "cfg 7"
    assert dev.pipeline_call_options == {"max_sequence_length": 64}  # T5 padded as training pads it
    assert schnell.pipeline_call_options == {"max_sequence_length": 256}  # kohya's [schnell] default
    assert dev.architecture.guidance_note(dev.denoiser, 3.5) == "guidance 3.5 (embedded)"
    assert schnell.architecture.guidance_note(schnell.denoiser, 3.5) == "no guidance"
