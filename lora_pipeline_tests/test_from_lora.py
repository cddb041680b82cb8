"""Issue 25's start from an existing LoRA (`from_lora`, kohya's --network_weights; run/start_lora.py): a tiny-sd
LoRA trained for one epoch (two steps), loaded exactly into a fresh network before the first step, continued by a
one-step run named by its pipeline reference, whose header and provenance name the starting file and trace both
chains; and every mismatch refused in one line naming the file."""

from __future__ import annotations

import copy
import functools
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_file
from lora_pipeline.core.lineage.provenance import trace_lora
from lora_pipeline.core.lineage.provenance_text import format_provenance
from lora_pipeline.core.models.loading import load_base_model
from lora_pipeline.core.schema import hashed_values
from lora_pipeline.core.training.kohya.lora_file import read_lora_metadata
from lora_pipeline.core.training.kohya.network import add_network, kohya_state_dict
from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline.core.training.run.start_lora import load_start_lora, resolve_start
from lora_pipeline_tests.helpers import tiny_recipe, train

pytestmark = pytest.mark.xdist_group("from_lora")

FIRST = tiny_recipe(epochs=1, validation_split=0.0, optimizer="AdamW", learning_rate=5e-2)
START = "train-v1/tiny/e001"
NEXT = replace(FIRST, name="next", from_lora=START, max_train_steps=1)


@pytest.fixture(scope="module")
def root(module_snapshot):
    return module_snapshot(n=4, repeats=1)


@pytest.fixture(scope="module")
def first(root) -> Path:
    """The starting LoRA, where the pipeline keeps it (loras/<version>/<recipe>/)."""
    result, _ = train(root, FIRST, "loras/train-v1/tiny")
    return Path(result.epochs[-1]["file"])


@functools.cache
def _base(models: Path):
    return load_base_model(models, "tiny-sd", "sd15", "cpu", torch.float32)


def _network(root, recipe, seed: int = 7):
    """tiny-sd with the recipe's freshly built network (a copy of one loaded model: loading is the slow part)."""
    base = copy.deepcopy(_base(root.models))
    add_network(base, recipe.network, seed)
    return base


def test_the_adapters_hold_the_files_weights_before_the_first_step(root, first):
    base = _network(root, NEXT)
    fresh = kohya_state_dict(base.denoiser, NEXT.model_family)
    held = load_file(first)
    assert any(not torch.equal(fresh[k], held[k]) for k in held)  # the init is not the file
    start = resolve_start(root, NEXT)
    assert start.path == first and start.sha256 == sha256_file(first)
    load_start_lora(base, NEXT, start)
    loaded = kohya_state_dict(base.denoiser, NEXT.model_family)
    assert loaded.keys() == held.keys() and all(torch.equal(loaded[k], held[k]) for k in held)


def test_a_run_continues_from_the_lora_and_provenance_traces_both_chains(root, first):
    fresh, _ = train(root, replace(NEXT, from_lora=None), "fresh")
    result, lines = train(root, NEXT, "loras/train-v1/next")
    assert any(line.startswith("starting from LoRA loras/train-v1/tiny/train-v1-tiny-e001.safetensors")
               for line in lines)
    # the same first batch and noise on other weights before step 1: another loss
    assert result.loss_history[0] != fresh.loss_history[0]
    out = Path(result.epochs[-1]["file"])
    meta = read_lora_metadata(out)
    named = "loras/train-v1/tiny/train-v1-tiny-e001.safetensors"
    assert meta["lora_pipeline.from_lora"] == meta["ss_network_weights"] == named
    assert meta["lora_pipeline.from_lora_sha256"] == sha256_file(first)
    chain = trace_lora(root, out)
    assert chain.from_lora.path == named and chain.from_lora.status == "unchanged"
    assert chain.from_lora.chain["lora"]["sha256"] == sha256_file(first)
    assert chain.from_lora.chain["recipe"]["name"] == "tiny" and "from_lora" not in chain.from_lora.chain
    text = format_provenance(chain)
    assert f"started from LoRA {named}" in text and "  | recipe tiny" in text
    from lora_pipeline.defs.metadata import provenance_metadata  # the training partition's page records it

    shown = provenance_metadata(chain, root.dataset("train-v1") / "manifest.jsonl")["from_lora"]
    assert shown == f"{named} (sha256 {sha256_file(first)}, unchanged)"
    first.write_bytes(first.read_bytes()[:-4] + b"\0\0\0\0")  # the starting file changes afterwards
    later = trace_lora(root, out)
    assert later.from_lora.status == "changed"
    assert f"starting LoRA {named} changed since this LoRA was trained from it" in later.status


def _refused(root, recipe, path: Path | None = None) -> str:
    with pytest.raises(UserError) as caught:
        start = resolve_start(root, recipe)
        load_start_lora(_network(root, recipe), recipe, start)
    message = str(caught.value)
    assert "\n" not in message and (path is None or str(path) in message)
    return message


def test_a_lora_that_does_not_fit_the_recipe_is_refused_in_one_line(root, tmp_path):
    recipe = replace(NEXT, from_lora=None)
    base = _network(root, recipe)
    tensors = kohya_state_dict(base.denoiser, recipe.model_family)
    own = tmp_path / "own.safetensors"
    save_file(tensors, own, metadata={"ss_base_model_version": "sd_v1"})
    assert "rank 4 where the recipe trains rank 8" in _refused(root, replace(recipe, from_lora=str(own),
                                                                            network_dim=8), own)
    assert "alpha 2 where the recipe's is 3" in _refused(root, replace(recipe, from_lora=str(own),
                                                                      network_alpha=3.0), own)
    message = _refused(root, replace(recipe, from_lora=str(own), conv_dim=2), own)
    assert "its modules are not the recipe's: " in message and "missing" in message
    assert "use_dora differs" in _refused(root, replace(recipe, from_lora=str(own), use_dora=True), own)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file(tensors, sdxl, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    assert "a LoRA of sdxl_base_v1-0 (ss_base_model_version), but the recipe trains sd15" in _refused(
        root, replace(recipe, from_lora=str(sdxl)), sdxl)
    assert "does not exist" in _refused(root, replace(recipe, from_lora="train-v1/tiny/e009"))


def test_from_lora_counts_in_the_recipe_hash_only_when_set():
    plain = replace(NEXT, from_lora=None)
    assert "from_lora" not in hashed_values(Recipe, plain.resolved())
    assert hashed_values(Recipe, NEXT.resolved())["from_lora"] == START and NEXT.sha256 != plain.sha256


@pytest.mark.parametrize(("model", "fields"), [
    ("tiny-sdxl", {"network_train_unet_only": False, "use_dora": True}),  # sgm names, lora_te1_/te2_, dora_scale
    ("tiny-flux", {"network_train_unet_only": False}),  # BFL's fused Linears, CLIP-L's lora_te1_
])
def test_every_layout_loads_exactly(root, tmp_path, model, fields):
    from lora_pipeline_tests.helpers import FAMILIES

    recipe = replace(NEXT, base_model=model, model_family=FAMILIES[model], from_lora=None, **fields)
    trained = load_base_model(root.models, model, recipe.model_family, "cpu", torch.float32)
    add_network(trained, recipe.network, recipe.seed)
    with torch.no_grad():  # weights as training leaves them: every tensor away from its init
        for i, param in enumerate(p for m in (trained.denoiser, *trained.text_encoders) for p in m.parameters()
                                  if p.requires_grad):
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(i)))
    file = tmp_path / "trained.safetensors"
    save_file(kohya_state_dict(trained.denoiser, recipe.model_family, text_encoders=trained.text_encoders), file)
    recipe = replace(recipe, from_lora=str(file))
    fresh = load_base_model(root.models, model, recipe.model_family, "cpu", torch.float32)
    add_network(fresh, recipe.network, seed=3)
    load_start_lora(fresh, recipe, resolve_start(root, recipe))
    held = load_file(file)
    loaded = kohya_state_dict(fresh.denoiser, recipe.model_family, text_encoders=fresh.text_encoders)
    assert loaded.keys() == held.keys() and all(torch.equal(loaded[k], held[k]) for k in held)
    assert any(k.startswith("lora_te") for k in held)
