"""benchmarks/gpu_e2e.py's own parts: the generated handoff and the drill recipes (the chain they feed through
Dagster and MLflow is what test_defs_training covers on the tiny models)."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from lora_pipeline.core.paths import REPO_ROOT
from lora_pipeline.core.training.recipe import load_recipe


def _drill():
    path = REPO_ROOT / "benchmarks" / "gpu_e2e.py"
    spec = importlib.util.spec_from_file_location("gpu_e2e", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_handoff_has_distinct_images_of_every_size_with_schema_captions(tmp_path):
    drill = _drill()
    drill.generate_images(tmp_path, 8, drill.SMOKE_SIZES)
    images = sorted(tmp_path.glob("*.jpg"))
    assert len(images) == 8 and (tmp_path / "_READY").is_file()
    assert {Image.open(p).size for p in images} == set(drill.SMOKE_SIZES)
    assert len({hashlib.sha256(p.read_bytes()).hexdigest() for p in images}) == 8
    vocabulary = {tag for options in drill.TAGS.values() for tag in options}
    for image in images:
        trigger, *tags = image.with_suffix(".txt").read_text().strip().split(", ")
        assert trigger == drill.TRIGGER and len(tags) == len(drill.TAGS) and set(tags) <= vocabulary


@pytest.mark.parametrize(("family", "smoke"), [("sd15", False), ("sdxl", False), ("sdxl", True)])
def test_drill_recipes_are_valid_recipes_at_the_models_resolution(tmp_path, family, smoke):
    drill = _drill()
    name = f"drill-{family}"
    path = Path(tmp_path / f"{name}.yaml")
    path.write_text(yaml.safe_dump(drill.recipe(name, family, f"random-{family}", 20, smoke, fast_path=False)))
    recipe = load_recipe(path)
    assert recipe.resolution == (64 if smoke else {"sd15": 512, "sdxl": 1024}[family])
    assert recipe.model_family == family and recipe.fast_path is False and recipe.save_every_n_epochs == 5
