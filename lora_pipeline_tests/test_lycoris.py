"""LoHa and LoKr (`network_algo`, core/models/lycoris.py), trained for real on tiny-sd and tiny-sdxl (one step each):
the epoch file holds LyCORIS' keys and metadata, every module's weight delta rebuilt from the file by the loaders'
own formula (ComfyUI's weight_adapter/loha.py and lokr.py `calculate_weight`, which A1111's network_hada.py and
network_lokr.py share) equals peft's delta of the trained adapter, the evaluation grid loads the file back with the
same deltas and weighs it, and a LoHa run gets its grid and recommendation. The trained adapter is put back from
the run's resume state (network.add_network's `resume_from`), and an interrupted LoKr run resumes to the same
file. The recipe's refusals, each one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.models.kohya_names import TEXT_MODEL
from lora_pipeline.core.models.loading import load_base_model
from lora_pipeline.core.models.lycoris import is_lycoris_layer, kohya_module_paths
from lora_pipeline.core.models.sampling import load_pipeline, loaded_lora, set_lora_weight
from lora_pipeline.core.training.kohya.lora_file import read_lora_metadata
from lora_pipeline.core.training.kohya.network import add_network
from lora_pipeline.core.training.recipe import parse_recipe
from lora_pipeline.core.training.recipe_checks import fast_path_blockers
from lora_pipeline.core.training.run.checkpoint import load_state
from lora_pipeline_tests.helpers import FAMILIES, TINY, Crash, assert_same_tensors, crash_after, tiny_recipe, train

pytestmark = pytest.mark.xdist_group("lycoris")

ONE_STEP = {"epochs": 1, "max_train_steps": 1, "validation_split": 0.0, "optimizer": "AdamW", "learning_rate": 1e-2}
LYCORIS_SUFFIXES = {"loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
                    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}}
CASES = {  # algo, base model, more recipe fields
    "loha-sd15-locon": ("loha", "tiny-sd", {"conv_dim": 4, "conv_alpha": 2.0}),
    "lokr-sd15": ("lokr", "tiny-sd", {"lokr_factor": 4}),
    "lokr-sdxl-text": ("lokr", "tiny-sdxl", {"network_train_unet_only": False}),
}


def loader_delta(tensors: dict[str, torch.Tensor], key: str, shape: torch.Size) -> torch.Tensor:
    """ComfyUI's calculate_weight of one module at strength 1 (LoHa: (w1a w1b) * (w2a w2b) * alpha / rank of w1b;
    LoKr: kron(w1, w2) * alpha / rank of a decomposed factor, * 1 when both are full)."""
    t = {name[len(key) + 1:]: value.double() for name, value in tensors.items() if name.startswith(key + ".")}
    alpha = float(t["alpha"])
    if "hada_w1_a" in t:
        scale = alpha / t["hada_w1_b"].shape[0]
        return ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(shape) * scale
    dim = None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
    else:
        dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    else:
        dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"] @ t["lokr_w2_b"]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / dim if dim is not None else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale


def module_keys(base, family) -> dict[str, object]:
    """{kohya key: peft LoHa/LoKr module} of the denoiser and the text encoders, named as network.py names them."""
    paths = {path: key for key, path in kohya_module_paths(family, base.denoiser).items()}
    found = {paths[name]: m for name, m in base.denoiser.named_modules() if is_lycoris_layer(m)}
    for prefix, encoder in zip(family.text_prefixes, base.text_encoders, strict=False):
        level = "" if hasattr(encoder, "text_model") else TEXT_MODEL
        found |= {prefix + level + name.replace(".", "_"): m for name, m in encoder.named_modules()
                  if is_lycoris_layer(m)}
    return found


@pytest.fixture(scope="module")
def root(module_snapshot):
    return module_snapshot(n=2, repeats=1)


@pytest.fixture(scope="module")
def trained(root):
    """{case: (recipe, result, base model with the run's trained adapter put back from its resume state)}."""
    runs = {}
    for case, (algo, model, extra) in CASES.items():
        recipe = tiny_recipe(**ONE_STEP, base_model=model, model_family=FAMILIES[model], network_algo=algo, **extra)
        result, _ = train(root, recipe, case)
        base = load_base_model(root.models, model, recipe.model_family)
        add_network(base, recipe.network, recipe.seed, load_state(root.root / case).lora)
        runs[case] = (recipe, result, base)
    return runs


@pytest.mark.parametrize("case", list(CASES))
def test_the_file_holds_lycoris_keys_whose_loader_delta_is_the_trained_one(trained, case):
    recipe, result, base = trained[case]
    algo = recipe.network_algo
    path = Path(result.epochs[0]["file"])
    tensors, meta = load_file(str(path)), read_lora_metadata(path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == algo and args.get("factor") == {"lokr": str(recipe.lokr_factor)}.get(algo)
    assert {key.split(".", 1)[1] for key in tensors} <= LYCORIS_SUFFIXES[algo]
    modules = module_keys(base, base.architecture)
    assert {key.split(".", 1)[0] for key in tensors} == set(modules)  # every key maps, every module is written
    if not recipe.network_train_unet_only:
        assert any(key.startswith("lora_te2_") for key in modules)
    if recipe.conv_dim:  # LoCon: the ResNets' 3x3 convs at conv_dim
        conv = tensors["lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_b"]
        assert conv.shape[0] == 4 and conv.shape[1] % 9 == 0
    moved = 0
    for key, module in modules.items():
        want = module.get_delta_weight("default").double()
        got = loader_delta(tensors, key, module.get_base_layer().weight.shape)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9, msg=key)
        moved += bool(want.abs().max() > 0) and key.startswith("lora_unet_")
    # one step moved every U-Net module away from its zero delta (SDXL's text encoder 1 ends a layer early)
    assert moved == sum(key.startswith("lora_unet_") for key in modules)
    if algo == "lokr":  # both LoKr forms: a full w2 (small sides) and a rank-decomposed one
        assert any(k.endswith(".lokr_w2") for k in tensors) and any(k.endswith(".lokr_w2_b") for k in tensors)
    if recipe.lokr_factor == 4:  # the factor is the side of w1
        assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1"].shape[1] == 4


@pytest.mark.parametrize("case", ["loha-sd15-locon", "lokr-sd15"])
def test_the_evaluation_loads_the_file_back_with_the_trained_deltas_and_weighs_it(root, trained, case):
    recipe, result, trained_base = trained[case]
    trained_modules = module_keys(trained_base, trained_base.architecture)
    base = load_base_model(root.models, recipe.base_model, recipe.model_family)
    pipe = load_pipeline(base, torch.float32)
    with loaded_lora(pipe, Path(result.epochs[0]["file"]), 1) as adapter:
        loaded = {key: m for key, m in module_keys(base, base.architecture).items()}
        assert set(loaded) == set(trained_modules)
        set_lora_weight(pipe, adapter, 0.5)
        for key, module in loaded.items():
            want = trained_modules[key].get_delta_weight("default")
            torch.testing.assert_close(module.get_delta_weight(adapter), 0.5 * want, rtol=1e-5, atol=1e-9, msg=key)
    assert not any(is_lycoris_layer(m) and m.r for m in base.denoiser.modules())  # deleted again


def test_the_evaluation_refuses_a_lycoris_text_encoder_in_one_line(root, trained):
    recipe, result, _ = trained["lokr-sdxl-text"]
    pipe = load_pipeline(load_base_model(root.models, recipe.base_model, recipe.model_family), torch.float32)
    needle = "only the denoiser's LoHa/LoKr modules are loaded back"
    with pytest.raises(UserError, match=needle) as caught, loaded_lora(pipe, Path(result.epochs[0]["file"]), 1):
        pass
    assert "\n" not in str(caught.value)


def test_a_lokr_run_resumes_to_the_same_files(root):
    """Two one-step epochs, interrupted after the first and resumed: the same losses and the same last file."""
    recipe = tiny_recipe(epochs=2, validation_split=0.0, optimizer="AdamW", learning_rate=1e-2, network_algo="lokr")
    clean, _ = train(root, recipe, "lokr-clean")
    with pytest.raises(Crash):
        train(root, recipe, "lokr-resumed", log=crash_after(1))
    resumed, _ = train(root, recipe, "lokr-resumed")
    assert resumed.resumed_from_epoch == 1 and resumed.loss_history == clean.loss_history
    assert_same_tensors(clean.epochs[-1]["file"], resumed.epochs[-1]["file"])


def test_the_hash_counts_network_algo_only_when_set_and_the_refusals_are_one_line():
    assert tiny_recipe().sha256 == tiny_recipe(network_algo="lora", lokr_factor=-1).sha256
    assert tiny_recipe(network_algo="loha").sha256 != tiny_recipe().sha256
    assert fast_path_blockers(tiny_recipe(network_algo="loha"))
    refused = {
        "use_dora is a LoRA option": {"network_algo": "loha", "use_dora": True},
        "lokr_factor needs network_algo: lokr": {"lokr_factor": 2},
        "lokr_factor must be -1": {"network_algo": "lokr", "lokr_factor": 0},
        "network_algo is not an option of a FLUX.1": {"base_model": "tiny-flux", "model_family": "flux1",
                                                       "network_algo": "lokr"},
        "fast_path: true is impossible here: network_algo: lokr": {"network_algo": "lokr", "fast_path": True},
    }
    for needle, fields in refused.items():
        with pytest.raises(UserError, match=needle) as caught:
            parse_recipe({**TINY, **fields}, Path("tiny.yaml"))
        assert "\n" not in str(caught.value)


def test_a_loha_run_gets_its_grid_and_recommendation(root):
    """The whole evaluation on a trained LoHa: both epochs load, the weight columns show it, a recommendation."""
    from lora_pipeline.core.evaluation import evaluate_lora
    from lora_pipeline.core.training.run.tracking import TrainingTracker
    from lora_pipeline.core.training.run.trainer import train_lora

    recipe = tiny_recipe(name="loha-grid", epochs=2, validation_split=0.0, optimizer="AdamW", learning_rate=5e-2,
                         network_algo="loha", sample_prompts=("trg, red body",), sample_steps=1,
                         eval_weights=(1.0, 2.0))
    trained = train_lora(root, "train-v1", recipe, out_dir=root.loras("train-v1", recipe.name), device="cpu",
                         provenance={"code_commit": "test-commit"}, tracker=TrainingTracker(root.mlflow),
                         log=lambda _: None)
    params = TrainingTracker(root.mlflow).client.get_run(trained.mlflow_run_id).data.params
    assert (params["network_algo"], params["lokr_factor"]) == ("loha", "-1")  # MLflow params, as every field
    result = evaluate_lora(root, "train-v1", recipe, log=lambda _: None, device="cpu")
    assert result.epochs == [1, 2] and result.grid_paths[0].is_file()
    assert result.recommendation["recommended_epoch"] in (1, 2)
    losses = [row["val_loss"] for row in result.loss_rows]
    assert all(math.isfinite(v) for v in losses) and losses[0] != losses[1]
