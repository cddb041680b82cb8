"""DoRA files, trained for real on tiny-sd (LoCon and the text encoder too, one epoch of two steps).

The evaluation loads them (core/models/dora.py) and gets its grid and recommendation. Each loader's DoRA
arithmetic, rewritten here from the loader's own code (cited at each function), is applied to the written file
and compared, module by module, with the weights of peft's trained adapter (ground truth): what a user of that
loader gets. The README's DoRA paragraph quotes the errors measured here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_pipeline.core.evaluation.evaluate import evaluate_lora
from lora_pipeline.core.models.dora import adapter_modules
from lora_pipeline.core.models.families import model_family
from lora_pipeline.core.models.kohya_names import text_key_prefixes
from lora_pipeline.core.models.loading import load_base_model
from lora_pipeline.core.models.lora_layout import denoiser_key_namer
from lora_pipeline.core.models.sampling import load_pipeline, loaded_lora, set_lora_weight
from lora_pipeline.core.training.kohya.lora_file import read_lora_metadata
from lora_pipeline.core.training.kohya.network import add_network
from lora_pipeline.core.training.run.checkpoint import load_state
from lora_pipeline.core.training.run.tracking import TrainingTracker
from lora_pipeline.core.training.run.trainer import train_lora
from lora_pipeline_tests.helpers import merged_delta, tiny_recipe

DORA = tiny_recipe(
    use_dora=True, conv_dim=4, conv_alpha=2.0, network_train_unet_only=False, enable_bucket=False, epochs=1,
    optimizer="AdamW", learning_rate=5e-2, sample_prompts=("trg, red body",), sample_steps=2,
    eval_weights=(0.5, 1.0),
)


@pytest.fixture(scope="module")
def trained(module_snapshot):
    root = module_snapshot(n=4, repeats=1)
    result = train_lora(root, "train-v1", DORA, out_dir=root.loras("train-v1", "tiny"), device="cpu",
                        provenance={"code_commit": "test-commit"}, tracker=TrainingTracker(root.mlflow),
                        log=lambda _: None)
    path = Path(result.epochs[-1]["file"])
    model = load_base_model(root.models, DORA.base_model, DORA.model_family)
    add_network(model, DORA.network, DORA.seed, load_state(result.out_dir).lora)
    return root, path, model


def _keyed_layers(model) -> dict[str, torch.nn.Module]:
    """{kohya module key: peft layer} of the trained adapter, named as the file writer names them."""
    family = model_family(DORA.model_family)
    key = denoiser_key_namer(family, model.denoiser)
    layers = {key(name): m for name, m in adapter_modules(model.denoiser, "default")}
    for prefix, encoder in text_key_prefixes(family.text_prefixes, model.text_encoders):
        layers.update({prefix + name.replace(".", "_"): m for name, m in adapter_modules(encoder, "default")})
    return layers


# --- each loader's arithmetic on one module of the file: the weight it puts in place of W -----------------------

def _delta(t: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """up @ down * alpha / rank, shaped as the weight (kohya networks/lora.py merge_to, conv as matrices)."""
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    return (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (t["alpha"] / down.shape[0])


def _row_norm(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.ndim - 1))


def lycoris(w: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """LyCORIS lycoris/modules/locon.py (kohya's `--network_module lycoris.kohya`): get_merged_weight ->
    apply_weight_decompose with wd_on_out=True (the default create_network_from_weights keeps):
    (W + dW) * dora_scale / (||W + dW||_row + eps)."""
    merged = w + _delta(t, w)
    return merged * (t["dora_scale"] / (_row_norm(merged) + torch.finfo(w.dtype).eps))


def comfyui(w: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """ComfyUI comfy/weight_adapter/base.py weight_decompose (as of v0.3.77): dora_scale.shape[0] == out picks the
    output axis, whose norm is taken of the base weight W, not of W + dW: (W + dW) * dora_scale / (||W||_row + eps)."""
    merged = w + _delta(t, w)
    if t["dora_scale"].shape[0] == w.shape[0]:
        norm = _row_norm(w)
    else:
        norm = merged.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True).reshape(
            w.shape[1], *[1] * (w.ndim - 1)).transpose(0, 1)
    return merged * (t["dora_scale"] / (norm + torch.finfo(w.dtype).eps))


def a1111(w: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """AUTOMATIC1111 extensions-builtin/Lora/network.py (1.10) finalize_updown -> apply_weight_decompose: the norm of
    W + dW per *input* column (shape (1, in, ...)), so an (out, 1) dora_scale broadcasts to (out, in):
    W + ((W + dW) * dora_scale / ||W + dW||_col - W) * multiplier."""
    merged = w + _delta(t, w)
    norm = merged.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True).reshape(
        w.shape[1], *[1] * (w.ndim - 1)).transpose(0, 1)
    return w + (merged * (t["dora_scale"] / norm) - w)


def plain(w: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """diffusers 0.42 (loaders/lora_pipeline.py lora_state_dict filters every `dora_scale` key with a warning) and
    kohya's networks.lora (load_weights: load_state_dict(strict=False) ignores it; merge_to adds up @ down *
    scale): the plain LoRA, W + dW."""
    return w + _delta(t, w)


LOADERS = {"LyCORIS / kohya lycoris.kohya": lycoris, "ComfyUI": comfyui, "A1111": a1111,
           "diffusers / kohya networks.lora": plain}


def _errors(model, tensors: dict[str, torch.Tensor], for_comfyui: bool = False) -> dict[str, float]:
    """Per loader, ||W_loader - W_trained|| / ||W_trained - W|| over all DoRA modules together. `for_comfyui`: the
    layout not chosen, dora_scale = m * ||W|| / ||W + dW|| (what ComfyUI's norm of W would need)."""
    wrong = dict.fromkeys(LOADERS, 0.0)
    change = 0.0
    for key, layer in _keyed_layers(model).items():
        t = {s: tensors[f"{key}.{s}"] for s in ("lora_up.weight", "lora_down.weight", "alpha", "dora_scale")}
        w = layer.get_base_layer().weight.detach()
        if for_comfyui:
            t["dora_scale"] = t["dora_scale"] * _row_norm(w) / _row_norm(w + _delta(t, w))
        want = w + merged_delta(layer, "default")  # peft's own merge of its trained DoRA adapter
        change += float((want - w).square().sum())
        for name, loader in LOADERS.items():
            wrong[name] += float((loader(w, t) - want).square().sum())
    return {name: (value / change) ** 0.5 for name, value in wrong.items()}


def test_each_loader_on_the_written_dora_file_against_the_trained_adapter(trained):
    _, path, model = trained
    tensors = load_file(path)
    meta = read_lora_metadata(path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2.0", "algo": "lora",
                                                   "dora_wd": "True", "wd_on_output": "True"}
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.dora_scale"].shape == (32, 1, 1, 1)
    # kohya's run keys as the trainer fills them: one of the four images held out, no buckets, the save time
    assert (meta["ss_num_validation_images"], meta["ss_bucket_info"]) == ("1", "null")
    assert float(meta["ss_training_finished_at"]) > float(meta["ss_training_started_at"])
    errors = _errors(model, tensors)
    print({name: f"{value:.3g}" for name, value in errors.items()})
    assert errors["LyCORIS / kohya lycoris.kohya"] < 1e-5  # exact (float32 rounding)
    # the others, as measured on this file (README): ComfyUI 0.1-0.2, A1111 several times the change itself,
    # the plain LoRA of diffusers and kohya's networks.lora about as large as the change
    assert 0.02 < errors["ComfyUI"] < 0.5
    assert errors["A1111"] > 2
    assert 0.3 < errors["diffusers / kohya networks.lora"] < 3
    # the other layout would make ComfyUI exact and LyCORIS as wrong as ComfyUI is now: one exact loader either way,
    # and the chosen one is the definition (peft, LyCORIS, the DoRA paper)
    other = _errors(model, tensors, for_comfyui=True)
    print({name: f"{value:.3g}" for name, value in other.items()})
    assert other["ComfyUI"] < 1e-5 and other["LyCORIS / kohya lycoris.kohya"] > 0.02


def test_a_dora_run_gets_its_grid_and_recommendation(trained):
    root, path, model = trained
    base = load_base_model(root.models, DORA.base_model, DORA.model_family, "cpu", torch.float32)
    pipe = load_pipeline(base, torch.float32)
    gen = torch.Generator().manual_seed(0)
    x, x4 = torch.randn(2, 32, generator=gen), torch.randn(1, 32, 8, 8, generator=gen)
    q, conv = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1"
    fc1 = "text_model.encoder.layers.0.mlp.fc1"
    trained_modules = (dict(model.denoiser.named_modules()), dict(model.text_encoders[0].named_modules()))
    with loaded_lora(pipe, path, 1, base.architecture) as adapter:
        modules = (dict(pipe.unet.named_modules()), dict(pipe.text_encoder.named_modules()))  # the peft layers now
        for index, name, inputs in ((0, q, x), (0, conv, x4), (1, fc1, x)):
            layer = modules[index][name if name in modules[index] else name.removeprefix("text_model.")]
            want = trained_modules[index][name if name in trained_modules[index] else name.removeprefix(
                "text_model.")](inputs)
            outputs = {}
            for weight in (0.0, 0.5, 1.0):
                set_lora_weight(pipe, adapter, weight)
                with torch.no_grad():
                    outputs[weight] = layer(inputs)
            # weight 1 is the trained DoRA module, 0 the base one, 0.5 the middle of the two (as ComfyUI, A1111)
            torch.testing.assert_close(outputs[1.0], want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(outputs[0.0], layer.get_base_layer()(inputs))
            torch.testing.assert_close(outputs[0.5], (outputs[0.0] + outputs[1.0]) / 2, rtol=1e-4, atol=1e-6)
            assert (outputs[1.0] - outputs[0.0]).abs().max() > 1e-3
    assert pipe.get_list_adapters() == {}

    result = evaluate_lora(root, "train-v1", DORA, device="cpu", log=lambda _: None)
    assert [p.name for p in result.grid_paths] == ["grid_0.png"] and result.grid_paths[0].is_file()
    assert result.recommendation["recommended_epoch"] == 1 and result.recommendation_json.is_file()
