"""The network and schedule options of issue 12, trained for real on the tiny models (few runs, shared).

One SD 1.5 run carries LoCon, the text-encoder LoRA, Lion, max_train_steps, save_every_n_steps and samples
while training; one SDXL run DoRA on U-Net and both text encoders, relative-step Adafactor, gradient
accumulation, the kohya noise options and v-prediction with zero terminal SNR, logged to MLflow; two one-step
runs compare 4 x batch 1 (accumulated) with batch 4, and a killed run resumes byte-identical.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from lora_pipeline.core.models.families import model_family
from lora_pipeline.core.models.kohya_names import for_diffusers
from lora_pipeline.core.models.loading import load_base_model
from lora_pipeline.core.models.sampling import loaded_lora, set_lora_weight
from lora_pipeline.core.schema import later_fields
from lora_pipeline.core.training.kohya.lora_file import read_lora_metadata
from lora_pipeline.core.training.kohya.network import add_network
from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline.core.training.run.checkpoint import load_state
from lora_pipeline.core.training.run.tracking import TrainingTracker
from lora_pipeline.core.training.run.trainer import train_lora
from lora_pipeline_tests.helpers import FAMILIES, Crash, assert_same_tensors, crash_after, tiny_recipe, train

# make test runs `-n 3 --dist loadgroup`: one worker runs this module, so its shared training runs happen once
pytestmark = pytest.mark.xdist_group("network")

SQUARE = {"enable_bucket": False, "validation_split": 0.2}
LOCON = tiny_recipe(
    **SQUARE, conv_dim=4, conv_alpha=2.0, network_train_unet_only=False, text_encoder_lr=5e-4,
    optimizer="Lion", learning_rate=1e-3, epochs=3, max_train_steps=3, save_every_n_steps=2,
    sample_prompts=("trg, red body",), sample_every_n_epochs=1, sample_steps=2,
)
DORA = tiny_recipe(
    **SQUARE, base_model="tiny-sdxl", model_family="sdxl", use_dora=True, network_train_unet_only=False,
    optimizer="Adafactor", learning_rate=1e-3, epochs=2, train_batch_size=1, gradient_accumulation_steps=2,
    multires_noise_iterations=3, multires_noise_discount=0.3, ip_noise_gamma=0.1, noise_offset=0.05,
    v_parameterization=True, zero_terminal_snr=True, debiased_estimation_loss=True, sample_prompts=("trg",),
    sample_every_n_epochs=2, sample_steps=2,
)


@pytest.fixture(scope="module")
def root(module_snapshot):
    return module_snapshot(n=5, repeats=1)  # 4 training images, one held out


@pytest.fixture(scope="module")
def locon(root):
    return train(root, LOCON, "locon")


@pytest.fixture(scope="module")
def dora(root):
    tracker = TrainingTracker(root.mlflow)
    lines: list[str] = []
    result = train_lora(root, "train-v1", DORA, out_dir=root.loras("train-v1", "tiny"), device="cpu",
                        provenance={"code_commit": "test-commit"}, tracker=tracker, log=lines.append)
    return result, lines, tracker


def _unet_inputs(unet, sdxl: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2, 4, 8, 8, generator=gen), "timestep": torch.tensor([100, 700]),
              "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)}
    if sdxl:
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=gen),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return inputs


def _trained_model(root, recipe: Recipe, out: Path):
    """The base model with the recipe's adapters set to the last resume state (what training ended with)."""
    base = load_base_model(root.models, recipe.base_model, recipe.model_family)
    add_network(base, recipe.network, recipe.seed, load_state(out).lora)
    return base


def _pipeline(root, recipe: Recipe):
    cls = StableDiffusionXLPipeline if recipe.model_family == "sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(str(root.models / recipe.base_model), local_files_only=True)


def _outputs(unet, encoder, tokenizer, sdxl: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenizer(["trg, red body"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return unet(**_unet_inputs(unet, sdxl)).sample, encoder(ids)[0]


def test_locon_text_encoder_lion_steps_and_samples(root, locon):
    result, lines = locon
    # max_train_steps 3 with 2 steps per epoch: epoch 2 stops after its first step and is saved there
    assert result.steps_per_epoch == 2 and result.total_steps == 3 and len(result.loss_history) == 3
    assert [(Path(e["file"]).name, e["steps"]) for e in result.epochs] == [
        ("train-v1-tiny-e001.safetensors", 2), ("train-v1-tiny-e002.safetensors", 3)]
    assert [Path(f).name for f in result.step_files] == ["train-v1-tiny-step00000002.safetensors"]
    assert lines[0].startswith("text-encoder outputs are not cached: the text encoders carry a LoRA")
    last = Path(result.epochs[-1]["file"])
    meta = read_lora_metadata(last)
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2.0"}
    assert (meta["ss_network_module"], meta["ss_network_train_unet_only"]) == ("networks.lora", "False")
    assert (meta["ss_text_encoder_lr"], meta["ss_steps"], meta["ss_max_train_steps"]) == ("0.0005", "3", "3")
    assert meta["ss_optimizer"].startswith("lion_pytorch.lion_pytorch.Lion(")
    assert meta["lora_pipeline.recipe_sha256"] == LOCON.sha256

    tensors = load_file(last)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv}.lora_down.weight"].shape == (4, 32, 3, 3)
    assert tensors[f"{conv}.lora_up.weight"].shape == (32, 4, 1, 1) and tensors[f"{conv}.alpha"].item() == 2.0
    assert tensors["lora_unet_down_blocks_0_resnets_0_time_emb_proj.alpha"].item() == 2.0  # network_alpha
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight" in tensors
    assert tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape == (4, 32)
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "resnets" in k and "lora_up" in k)

    # diffusers loads the file (text-encoder keys through for_diffusers) and matches the trained modules
    trained = _trained_model(root, LOCON, result.out_dir)
    pipe = _pipeline(root, LOCON)
    base_out, base_text = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer, False)
    pipe.load_lora_weights(for_diffusers(tensors, [pipe.text_encoder]), adapter_name="locon")
    loaded_out, loaded_text = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer, False)
    expected_out, expected_text = _outputs(trained.unet, trained.text_encoders[0], trained.tokenizers[0], False)
    torch.testing.assert_close(loaded_out, expected_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loaded_text, expected_text, rtol=1e-4, atol=1e-5)
    assert (loaded_out - base_out).abs().max() > 1e-4 and (loaded_text - base_text).abs().max() > 1e-4

    # a sample strip per epoch (one 64 px image per prompt), the latest one reported
    strips = sorted(p.name for p in (result.out_dir / "samples").iterdir())
    assert strips == ["train-v1-tiny-e001.png", "train-v1-tiny-e002.png"]
    assert result.sample_strip == result.out_dir / "samples" / strips[-1]
    with Image.open(result.sample_strip) as strip:
        assert strip.size == (64, 64)



def test_resume_reproduces_the_run_and_every_new_option_changes_the_recipe_hash(root, locon):
    clean, _ = locon


    with pytest.raises(Crash):
        train(root, LOCON, "resumed", log=crash_after(1))
    assert not (root.root / "resumed" / "train-v1-tiny-e002.safetensors").exists()
    resumed, lines = train(root, LOCON, "resumed")
    assert resumed.resumed_from_epoch == 1 and any(line.startswith("resuming train-v1/tiny after epoch 1/2")
                                                  for line in lines)
    names = ["train-v1-tiny-e001.safetensors", "train-v1-tiny-e002.safetensors",
             "train-v1-tiny-step00000002.safetensors"]
    for name in names:
        assert (resumed.out_dir / name).read_bytes() == (clean.out_dir / name).read_bytes(), name
    assert resumed.loss_history == clean.loss_history and resumed.lr_history == clean.lr_history

    # a resume state only continues the same recipe: each new option, changed, gives another hash
    changes = {"conv_dim": 8, "conv_alpha": 4.0, "use_dora": False, "text_encoder_lr": 1e-3,
               "max_train_steps": 5, "save_every_n_steps": 3, "gradient_accumulation_steps": 2,
               "lr_scheduler_num_cycles": 2, "lr_scheduler_power": 2.0, "adafactor_relative_step": False,
               "multires_noise_iterations": 6, "multires_noise_discount": 0.4, "ip_noise_gamma": 0.05,
               "zero_terminal_snr": True, "debiased_estimation_loss": True, "v_parameterization": True,
               "sample_every_n_epochs": 2}
    later = later_fields(Recipe)
    assert set(changes) <= set(later)  # left out of the hash at these defaults, which are the fields' own
    assert all(later[name] == getattr(Recipe(name="x", base_model="m"), name) for name in later)
    hashes = {name: replace(LOCON, **{name: value}).sha256 for name, value in changes.items()
              if name not in ("zero_terminal_snr", "use_dora")}
    hashes["zero_terminal_snr"] = replace(LOCON, zero_terminal_snr=True, v_parameterization=True).sha256
    hashes["use_dora"] = replace(LOCON, use_dora=True).sha256
    assert LOCON.sha256 not in hashes.values() and len(set(hashes.values())) == len(changes)


def test_dora_adafactor_accumulation_and_noise_options_on_sdxl(root, dora):
    result, lines, tracker = dora
    assert result.steps_per_epoch == 2 and all(torch.isfinite(torch.tensor(result.loss_history)))
    assert lines[0].startswith("text-encoder outputs are not cached")
    path = Path(result.epochs[-1]["file"])
    meta = read_lora_metadata(path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}
    assert (meta["ss_gradient_accumulation_steps"], meta["ss_total_batch_size"]) == ("2", "2")
    assert (meta["ss_lr_scheduler"], meta["ss_optimizer"]) == (
        "adafactor:0.001", "transformers.optimization.Adafactor(relative_step=True,weight_decay=0.01)")
    assert (meta["ss_multires_noise_iterations"], meta["ss_multires_noise_discount"]) == ("3", "0.3")
    assert (meta["ss_ip_noise_gamma"], meta["ss_zero_terminal_snr"], meta["ss_debiased_estimation"]) == (
        "0.1", "True", "True")
    assert meta["modelspec.prediction_type"] == "v"
    assert result.lr_history[-1] != DORA.learning_rate  # relative step: Adafactor's own step size

    tensors = load_file(path)
    state = load_state(result.out_dir).lora
    q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    magnitude = state["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector.default.weight"]
    assert torch.equal(tensors[f"{q}.dora_scale"], magnitude.reshape(-1, 1))
    for prefix in ("lora_te1_text_model_", "lora_te2_text_model_"):
        assert f"{prefix}encoder_layers_0_mlp_fc1.dora_scale" in tensors

    # diffusers drops dora_scale ("not compatible in Diffusers") and shows another LoRA; the evaluation's loader
    # puts it back (core/models/dora.py), by the SDXL U-Net's sgm names and both text encoders' names
    trained = _trained_model(root, DORA, result.out_dir)
    pipe = _pipeline(root, DORA)
    pipe.load_lora_weights(for_diffusers(tensors, [pipe.text_encoder, pipe.text_encoder_2]), adapter_name="d")
    loaded, _ = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer, True)
    expected, expected_text = _outputs(trained.unet, trained.text_encoders[0], trained.tokenizers[0], True)
    assert (loaded - expected).abs().max() > 1e-3
    pipe.delete_adapters(["d"])
    with loaded_lora(pipe, path, 2, model_family("sdxl")) as adapter:
        set_lora_weight(pipe, adapter, 1.0)
        loaded, loaded_text = _outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer, True)
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loaded_text, expected_text, rtol=1e-4, atol=1e-5)

    run = tracker.client.get_run(result.mlflow_run_id)
    assert run.data.params["effective_batch_size"] == "2" and run.data.params["use_dora"] == "True"
    images = [a.path for a in tracker.client.list_artifacts(result.mlflow_run_id, "images")]
    assert images and all("samples" in name for name in images)  # the epoch-2 strip, as an MLflow image
    assert result.sample_strip is not None and result.sample_strip.name == "train-v1-tiny-e002.png"


def test_dora_run_resumes_to_the_same_tensors(root, dora):
    clean = dora[0]


    with pytest.raises(Crash):
        train(root, DORA, "dora-resumed", log=crash_after(1))
    resumed, _ = train(root, DORA, "dora-resumed")
    assert resumed.resumed_from_epoch == 1 and resumed.loss_history == clean.loss_history
    for mine, theirs in zip(resumed.epochs, clean.epochs, strict=True):
        assert_same_tensors(mine["file"], theirs["file"])  # headers differ: the MLflow run id


def test_sdxl_text_encoder_lora_loads_in_diffusers(root):
    recipe = tiny_recipe(**SQUARE, base_model="tiny-sdxl", model_family="sdxl", network_train_unet_only=False,
                         optimizer="AdamW", learning_rate=1e-2, epochs=1)
    result, _ = train(root, recipe, "sdxl-te")
    tensors = load_file(result.epochs[-1]["file"])
    assert {k.split("_encoder_layers")[0] for k in tensors if k.startswith("lora_te")} == {
        "lora_te1_text_model", "lora_te2_text_model"}
    trained = _trained_model(root, recipe, result.out_dir)
    pipe = _pipeline(root, recipe)
    ids = pipe.tokenizer(["trg, red body"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder_2(ids)[0]
        pipe.load_lora_weights(for_diffusers(tensors, [pipe.text_encoder, pipe.text_encoder_2]), adapter_name="x")
        for index, encoder in enumerate((pipe.text_encoder, pipe.text_encoder_2)):
            torch.testing.assert_close(encoder(ids)[0], trained.text_encoders[index](ids)[0], rtol=1e-4, atol=1e-5)
        assert (pipe.text_encoder_2(ids)[0] - before).abs().max() > 1e-4
        unet = pipe.unet(**_unet_inputs(pipe.unet, True)).sample
        torch.testing.assert_close(unet, trained.unet(**_unet_inputs(trained.unet, True)).sample, rtol=1e-4,
                                   atol=1e-5)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-flux"])
def test_accumulating_4_x_batch_1_matches_batch_4(root, model):
    one = dict(**SQUARE, optimizer="AdamWScheduleFree", learning_rate=1e-3, epochs=1, base_model=model,
               model_family=FAMILIES[model])
    big, _ = train(root, tiny_recipe(train_batch_size=4, **one), f"batch4-{model}")
    small, _ = train(root, tiny_recipe(train_batch_size=1, gradient_accumulation_steps=4, **one), f"accum4-{model}")
    assert big.total_steps == small.total_steps == 1
    a, b = load_file(big.epochs[0]["file"]), load_file(small.epochs[0]["file"])
    assert a.keys() == b.keys()
    # The same step up to float summation order. Adam-type steps divide by |g| + eps, which magnifies that
    # rounding for gradients near eps, so the tolerance is on the relative L2 distance of the trained
    # up-weights (measured 7.7e-5; one step of batch 1 without accumulation lands 1.2 away).
    ups = [k for k in a if k.endswith("lora_up.weight")]
    distance = sum(((a[k] - b[k]) ** 2).sum() for k in ups) ** 0.5 / sum((a[k] ** 2).sum() for k in ups) ** 0.5
    assert distance < 1e-3, distance
    assert abs(big.loss_history[0] - small.loss_history[0]) < 1e-6
    assert read_lora_metadata(Path(small.epochs[0]["file"]))["ss_total_batch_size"] == "4"
