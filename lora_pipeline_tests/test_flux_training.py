"""train_lora on tiny-flux (FLUX.1 [dev]-shaped): kohya's FLUX file layout and keys, the rectified-flow step's
options, train_blocks, resume, the text cache."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from lora_pipeline.core.models.kohya_names import for_diffusers
from lora_pipeline.core.models.loading import load_base_model
from lora_pipeline.core.training.inputs import encode
from lora_pipeline.core.training.kohya.lora_file import read_lora_metadata
from lora_pipeline.core.training.kohya.network import add_network, trainable
from lora_pipeline.core.training.recipe_groups import FlowSettings
from lora_pipeline.core.training.run.checkpoint import load_state
from lora_pipeline.core.training.step.flux_step import RectifiedFlow, pack_latents, unpack_latents
from lora_pipeline_tests.helpers import Crash, assert_same_deltas, crash_after, tiny_recipe, train

FLUX = {"base_model": "tiny-flux", "model_family": "flux1", "epochs": 2, "optimizer": "AdamW",
        "learning_rate": 1e-3}


@pytest.fixture
def flux_snapshot(train_snapshot):
    return train_snapshot(n=3, repeats=1)


def file_bytes(result) -> dict[str, bytes]:
    return {Path(e["file"]).name: Path(e["file"]).read_bytes() for e in result.epochs}


def test_two_epochs_write_kohya_flux_files(flux_snapshot):
    result, _ = train(flux_snapshot, tiny_recipe(**FLUX), "flux")
    assert len(result.epochs) == 2 and all(torch.isfinite(torch.tensor(result.loss_history)))
    path = Path(result.epochs[-1]["file"])
    tensors, meta = load_file(path), read_lora_metadata(path)
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert meta["ss_guidance_scale"] == "1.0" and meta["ss_timestep_sampling"] == "sigma"
    flux_keys = {"ss_sigmoid_scale", "ss_model_prediction_type", "ss_discrete_flow_shift", "ss_weighting_scheme"}
    assert flux_keys <= set(meta)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert tensors[f"{qkv}.lora_down.weight"].shape == (3 * 4, 16)  # q, k, v stacked: 3 x rank, hidden 16
    assert tensors[f"{qkv}.lora_up.weight"].shape == (3 * 16, 3 * 4)  # block-diagonal
    assert tensors[f"{qkv}.alpha"].item() == 3 * 2.0
    assert tensors["lora_unet_single_blocks_1_linear1.lora_down.weight"].shape[0] == 4 * 4
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert any(t.abs().max() > 0 for k, t in tensors.items() if k.endswith("lora_up.weight"))


@pytest.mark.parametrize("blocks", ["double", "single"])
def test_train_blocks_trains_only_those_blocks(flux_snapshot, blocks):
    result, _ = train(flux_snapshot, tiny_recipe(**{**FLUX, "epochs": 1, "train_blocks": blocks}), blocks)
    keys = load_file(result.epochs[0]["file"])
    assert keys and all(f"{blocks}_blocks" in k for k in keys)


def test_a_trained_double_block_and_clip_lora_loads_in_diffusers_with_the_trained_deltas(flux_snapshot):
    """diffusers' kohya FLUX converter reads single blocks at FLUX.1's widths only, hence `train_blocks: double`."""
    recipe = tiny_recipe(**{**FLUX, "epochs": 1, "train_blocks": "double", "network_train_unet_only": False})
    result, _ = train(flux_snapshot, recipe, "roundtrip")
    tensors = load_file(result.epochs[-1]["file"])
    assert any(k.startswith("lora_te1_") for k in tensors) and any(k.startswith("lora_unet_") for k in tensors)
    trained = load_base_model(flux_snapshot.models, "tiny-flux", "flux1")
    add_network(trained, recipe.network, recipe.seed, load_state(result.out_dir).lora)  # adapter "default"
    clip, t5 = trained.text_encoders
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=clip, tokenizer=None, text_encoder_2=t5,
                        tokenizer_2=None, transformer=trained.denoiser)
    pipe.load_lora_weights(for_diffusers(tensors, [clip]), adapter_name="file")
    assert_same_deltas(trained.denoiser, loaded="file", trained="default")
    assert_same_deltas(clip, loaded="file", trained="default")


def test_resume_gives_byte_identical_files(flux_snapshot):
    recipe = tiny_recipe(**{**FLUX, "epochs": 3})
    clean, _ = train(flux_snapshot, recipe, "clean")

    with pytest.raises(Crash):
        train(flux_snapshot, recipe, "resumed", log=crash_after(2))
    resumed, _ = train(flux_snapshot, recipe, "resumed")
    assert resumed.resumed_from_epoch == 2 and file_bytes(resumed) == file_bytes(clean)


def test_the_fast_path_replays_the_rectified_flow_step_byte_identically(flux_snapshot):
    # on a CPU the fast path's recorded step is called again (fastpath.CapturedStep): the static buffers, the copies
    # and the per-shape bookkeeping of the FLUX step are the GPU's, so the files equal the eager run's bit for bit
    plain, _ = train(flux_snapshot, tiny_recipe(**FLUX), "plain")
    fast, _ = train(flux_snapshot, tiny_recipe(**FLUX, fast_path=True), "fast")
    assert (plain.fast_path, fast.fast_path) == (False, True)
    assert fast.loss_history == plain.loss_history
    for a, b in zip(plain.epochs, fast.epochs, strict=True):
        ta, tb = load_file(a["file"]), load_file(b["file"])
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_pack_and_unpack_are_inverse():
    latents = torch.randn(2, 16, 8, 6)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 4 * 3, 64) and torch.equal(unpack_latents(tokens, 8, 6), latents)


@pytest.mark.parametrize("sampling", ["sigma", "uniform", "sigmoid", "shift", "flux_shift"])
@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"])
def test_each_sampling_and_weighting_takes_a_finite_step_that_changes_the_lora(tiny_model, sampling, weighting):
    base = load_base_model(tiny_model("tiny-flux").parent, "tiny-flux", "flux1")
    add_network(base, tiny_recipe(**FLUX).network, 0)
    flow = RectifiedFlow.of(FlowSettings(timestep_sampling=sampling, weighting_scheme=weighting), base.denoiser)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    noise, sigmas = flow.draw(tuple(latents.shape), generator)
    params = list(trainable(base).values())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    before = [p.detach().clone() for p in params]
    loss = flow.loss(base.denoiser, latents, noise, sigmas, torch.randn(2, 7, 32), torch.randn(2, 32),
                     mask=torch.ones(2, 1, 64, 64), loss_weights=torch.tensor([1.0, 0.5]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))


def test_captions_go_through_clip_and_t5_and_are_cached(tiny_model):
    from lora_pipeline.core.training.inputs.encode import TextSource

    base = load_base_model(tiny_model("tiny-flux").parent, "tiny-flux", "flux1", t5_max_length=64)
    text = TextSource(base, torch.float32, torch.device("cpu"), ["trg, red body"])
    cached = text.batch(["trg, red body"])
    assert list(text.cache) == ["trg, red body"] and cached.hidden.shape == (1, 64, 32)  # T5's states
    assert cached.pooled.shape == (1, 32) and torch.equal(cached.hidden, text.cache["trg, red body"].hidden)


def test_text_outputs_cached_on_disk_are_reused_and_train_byte_identically(flux_snapshot, monkeypatch):
    encoded: list[str] = []
    real = encode.encode_prompts

    def counting(base, captions, **kwargs):
        encoded.extend(captions)
        return real(base, captions, **kwargs)

    monkeypatch.setattr(encode, "encode_prompts", counting)
    recipe = tiny_recipe(**{**FLUX, "epochs": 1, "shuffle_caption": False, "cache_text_encoder_outputs_to_disk": True})
    first, _ = train(flux_snapshot, recipe, "first")
    captions = set(encoded)
    entries = sorted((flux_snapshot.cache / "text").rglob("*.safetensors"))
    assert captions and len(entries) == len(captions) == len(encoded)
    encoded.clear()
    second, _ = train(flux_snapshot, recipe, "second")
    assert encoded == [] and file_bytes(second) == file_bytes(first)  # no text encoder called for a caption
    plain, _ = train(flux_snapshot, replace(recipe, cache_text_encoder_outputs_to_disk=False), "plain")
    assert load_file(plain.epochs[0]["file"]).keys() == load_file(first.epochs[0]["file"]).keys()
    assert all(torch.equal(t, load_file(plain.epochs[0]["file"])[k]) for k, t in load_file(first.epochs[0]["file"])
               .items())
    # Another T5 token length is another entry; a damaged entry is encoded again.
    data = bytearray(entries[0].read_bytes())
    data[-1] ^= 0xFF
    entries[0].write_bytes(bytes(data))
    encoded.clear()
    lines: list[str] = []
    train(flux_snapshot, replace(recipe, t5xxl_max_token_length=32), "shorter")
    assert sorted(encoded) == sorted(captions)
    encoded.clear()
    train(flux_snapshot, recipe, "again", log=lines.append)
    assert len(encoded) == 1
    assert any("text cache: " in line and "does not match what it should hold" in line for line in lines)
    with pytest.raises(ValueError, match="cache_text_encoder_outputs_to_disk needs captions that never change and "
                                         "frozen text encoders .as kohya's.: not shuffle_caption: true"):
        tiny_recipe(**{**FLUX, "cache_text_encoder_outputs_to_disk": True})
