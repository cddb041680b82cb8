"""benchmarks/gpu_e2e.py's own parts: the generated handoff and the drill recipes of gpu_e2e_inputs.py (the chain they
feed through Dagster and MLflow is what test_defs_training covers on the tiny models)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from benchmarks.gpu_e2e_inputs import SMOKE_SIZES, TAGS, TRIGGER, generate_images, recipe
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
    generate_images(tmp_path, 8, SMOKE_SIZES)
    images = sorted(tmp_path.glob("*.jpg"))
    assert len(images) == 8 and (tmp_path / "_READY").is_file()
    assert {Image.open(p).size for p in images} == set(SMOKE_SIZES)
    assert len({hashlib.sha256(p.read_bytes()).hexdigest() for p in images}) == 8
    vocabulary = {tag for options in TAGS.values() for tag in options}
    for image in images:
        trigger, *tags = image.with_suffix(".txt").read_text().strip().split(", ")
        assert trigger == TRIGGER and len(tags) == len(TAGS) and set(tags) <= vocabulary


@pytest.mark.parametrize(("family", "smoke"), [("sd15", False), ("sdxl", False), ("sdxl", True), ("flux1", False),
                                             ("flux1", True)])
def test_drill_recipes_are_valid_recipes_at_the_models_resolution(tmp_path, family, smoke):
    name = f"drill-{family}"
    path = Path(tmp_path / f"{name}.yaml")
    path.write_text(yaml.safe_dump(recipe(name, family, f"random-{family}", 20, smoke, fast_path=False)))
    loaded = load_recipe(path)
    assert loaded.resolution == (64 if smoke else {"sd15": 512, "sdxl": 1024, "flux1": 1024}[family])
    assert loaded.model_family == family and loaded.fast_path is False and loaded.save_every_n_epochs == 5


def test_flux_recipe_is_the_one_h100_recipe():
    settings = recipe("drill-flux1", "flux1", "random-flux1", 1, False, None)
    assert {k: settings[k] for k in ("train_batch_size", "network_dim", "optimizer", "learning_rate", "fp8_base",
                                     "gradient_checkpointing", "train_blocks", "t5xxl_max_token_length",
                                     "sample_steps", "guidance_scale", "eval_weights", "eval_max_epochs")} == {
        "train_batch_size": 1, "network_dim": 16, "optimizer": "AdamW", "learning_rate": 1e-4, "fp8_base": True,
        "gradient_checkpointing": True, "train_blocks": "all", "t5xxl_max_token_length": 512, "sample_steps": 8,
        "guidance_scale": 3.5, "eval_weights": [1.0], "eval_max_epochs": 1}


def test_flux_smoke_drill_runs_the_chain_on_cpu(tmp_path, capsys):
    """tiny-flux through build, lora_epochs, evaluation_grid and the checks (FluxPipeline's load_lora_weights);
    no second process for FLUX.1."""
    report = tmp_path / "report.json"
    assert _drill().main(["--smoke", "--models", "flux1", "--root", str(tmp_path / "root"), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "no second run of flux1" in out and "whole drill" in out
    (model,) = json.loads(report.read_text())["models"]
    checks = model["checks"]
    assert checks["epoch_files"] == 1 and checks["diffusers_lora_layers"] > 0 and checks["provenance"] == "ok"
    assert checks["mlflow_status"] == "FINISHED" and checks["mlflow_epoch_artifacts"]


def test_the_drill_gives_its_dagster_home_a_config_with_telemetry_off(tmp_path, monkeypatch, caplog):
    import dagster as dg

    for key in ("LORA_PIPELINE_DATA", "DAGSTER_HOME"):
        monkeypatch.delenv(key, raising=False)
    _drill()._environment(tmp_path)  # before the fix: a DAGSTER_HOME that did not exist yet, without dagster.yaml
    assert (tmp_path / ".dagster_home" / "dagster.yaml").is_file()
    with caplog.at_level("WARNING", logger="dagster"), dg.DagsterInstance.get() as inst:
        assert not inst.telemetry_enabled
    assert "No dagster instance configuration file" not in caplog.text
