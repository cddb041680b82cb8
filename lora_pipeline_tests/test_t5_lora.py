"""FLUX.1's T5 text-encoder LoRA (`train_t5xxl`, kohya's network_args of that name) on tiny-flux, trained for real:
kohya's `lora_te3_` keys beside CLIP-L's `lora_te1_`, `ss_network_args`, the modules loaded back onto T5 with the
trained weight deltas by the evaluation's loader (sampling.loaded_lora; diffusers' FLUX loader drops `lora_te3_`
keys, test_flux_names.py shows it, so t5_lora.py places them), and the recipe combinations kohya refuses."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from diffusers import FluxPipeline
from safetensors.torch import load_file

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.models.loading import load_base_model
from lora_pipeline.core.models.sampling import loaded_lora, set_lora_weight
from lora_pipeline.core.models.t5_lora import delete_t5_lora, load_t5_lora, weigh_t5_lora
from lora_pipeline.core.schema import later_fields
from lora_pipeline.core.training.kohya.lora_file import read_lora_metadata
from lora_pipeline.core.training.kohya.network import add_network, kohya_state_dict, text_targets
from lora_pipeline.core.training.recipe import Recipe, load_recipe
from lora_pipeline.core.training.run.checkpoint import load_state
from lora_pipeline_tests.helpers import assert_same_deltas, lora_layers, merged_delta, tiny_recipe, train

FLUX = {"base_model": "tiny-flux", "model_family": "flux1", "epochs": 1, "optimizer": "AdamW", "learning_rate": 1e-3}
# diffusers' kohya FLUX converter reads single blocks at FLUX.1's widths only, hence `train_blocks: double`
FLUX_T5 = {**FLUX, "train_blocks": "double", "network_train_unet_only": False, "train_t5xxl": True}


def test_t5_lora_trains_is_written_in_kohya_names_and_loads_back_with_the_trained_deltas(train_snapshot):
    root = train_snapshot(n=3, repeats=1)
    recipe = tiny_recipe(**FLUX_T5)
    result, lines = train(root, recipe, "t5")
    path = Path(result.epochs[-1]["file"])
    tensors, meta = load_file(path), read_lora_metadata(path)
    trained = load_base_model(root.models, "tiny-flux", "flux1")
    clip, t5 = trained.text_encoders
    te3 = {key.split(".")[0] for key in tensors if key.startswith("lora_te3_")}
    assert te3 == {"lora_te3_" + name.replace(".", "_") for name in text_targets(t5)}  # every T5 Linear kohya trains
    assert {
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
        "lora_te3_encoder_block_1_layer_0_SelfAttention_o",
        "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0",
        "lora_te3_encoder_block_0_layer_1_DenseReluDense_wo",
    } <= te3 and not any("relative_attention_bias" in name for name in te3)  # Linears only
    assert any(key.startswith("lora_te1_") for key in tensors) and any(key.startswith("lora_unet_") for key in tensors)
    q = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    assert tensors[f"{q}.lora_down.weight"].shape == (4, 32) and tensors[f"{q}.alpha"].item() == 2.0
    assert all(tensors[f"{name}.lora_up.weight"].abs().max() > 0 for name in te3)  # T5's LoRA trained
    assert json.loads(meta["ss_network_args"]) == {"train_t5xxl": "True"}  # as kohya writes its network_args
    assert meta["ss_network_train_unet_only"] == "False"
    assert any("text-encoder outputs are not cached" in line for line in lines)

    add_network(trained, recipe.network, recipe.seed, load_state(result.out_dir).lora)  # adapter "default"
    pipe = FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=clip,
        tokenizer=None,
        text_encoder_2=t5,
        tokenizer_2=None,
        transformer=trained.denoiser,
    )
    with loaded_lora(pipe, path, 1) as adapter:
        assert_same_deltas(t5, loaded=adapter, trained="default")
        assert_same_deltas(clip, loaded=adapter, trained="default")
        assert_same_deltas(trained.denoiser, loaded=adapter, trained="default")
        set_lora_weight(pipe, adapter, 0.5)  # the grid's weights reach T5 as they reach the transformer
        layer = dict(lora_layers(t5, adapter))["encoder.block.0.layer.0.SelfAttention.q"]
        assert layer.active_adapters == [adapter] and layer.scaling[adapter] == pytest.approx(0.5 * 2.0 / 4)
    assert lora_layers(t5, adapter) == [] and lora_layers(trained.denoiser, adapter) == []  # deleted with the rest


def test_without_train_t5xxl_text_encoder_training_leaves_t5_alone(tiny_model):
    base = load_base_model(tiny_model("tiny-flux").parent, "tiny-flux", "flux1")
    recipe = tiny_recipe(**{**FLUX, "network_train_unet_only": False})
    add_network(base, recipe.network, 0)
    clip, t5 = base.text_encoders
    assert lora_layers(clip, "default") and lora_layers(t5, "default") == []
    tensors = kohya_state_dict(base.denoiser, "flux1", text_encoders=base.text_encoders)
    assert any(k.startswith("lora_te1_") for k in tensors) and not any(k.startswith("lora_te3_") for k in tensors)


def test_each_epoch_loads_weighs_and_deletes_its_t5_modules_leaving_nothing_behind(tiny_model):
    folder = tiny_model("tiny-flux").parent
    source = load_base_model(folder, "tiny-flux", "flux1")
    add_network(source, tiny_recipe(**FLUX_T5).network, 0)
    t5 = source.text_encoders[1]
    with torch.no_grad():
        for _, layer in lora_layers(t5, "default"):
            torch.nn.init.normal_(layer.lora_B["default"].weight)  # peft's zeros would show no delta
    tensors = kohya_state_dict(source.denoiser, "flux1", text_encoders=source.text_encoders)
    pipe = SimpleNamespace(text_encoder_2=load_base_model(folder, "tiny-flux", "flux1").text_encoders[1])
    for epoch in (1, 2, 3):  # as the grid goes through the epoch files
        load_t5_lora(pipe, tensors, f"e{epoch}")
        weigh_t5_lora(pipe, f"e{epoch}", 1.0)
        loaded, trained = dict(lora_layers(pipe.text_encoder_2, f"e{epoch}")), dict(lora_layers(t5, "default"))
        assert sorted(loaded) == sorted(trained)
        for name, layer in trained.items():
            torch.testing.assert_close(merged_delta(loaded[name], f"e{epoch}"), merged_delta(layer, "default"))
        delete_t5_lora(pipe, f"e{epoch}")
        assert lora_layers(pipe.text_encoder_2, f"e{epoch}") == [] and not hasattr(pipe.text_encoder_2, "peft_config")
    load_t5_lora(SimpleNamespace(text_encoder_2=None), {}, "e1")  # a file without T5 modules needs no T5
    with pytest.raises(ValueError, match="has T5 modules .* but the pipeline has no text_encoder_2"):
        load_t5_lora(SimpleNamespace(text_encoder_2=None), tensors, "e1")


def test_unset_or_false_train_t5xxl_keeps_the_recipe_hash():
    plain = tiny_recipe(**{**FLUX, "network_train_unet_only": False})
    assert "train_t5xxl" in later_fields(Recipe)
    assert replace(plain, train_t5xxl=False).sha256 == plain.sha256
    assert replace(plain, train_t5xxl=True).sha256 != plain.sha256


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"train_t5xxl": True}, "train_t5xxl is not an option of an SD 1.x-style model (model_family: sd15)"),
        ({**FLUX, "train_t5xxl": True}, "train_t5xxl needs network_train_unet_only: false"),
        (
            {**FLUX_T5, "shuffle_caption": False, "cache_text_encoder_outputs_to_disk": True},
            "cache_text_encoder_outputs_to_disk cannot be used with train_t5xxl: true",
        ),
    ],
)
def test_combinations_kohya_refuses_are_one_line(tmp_path, fields, needle):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"base_model": "tiny-sd", **fields}))
    with pytest.raises(UserError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path)) and needle in message, message
