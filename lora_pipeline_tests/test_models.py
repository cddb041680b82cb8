"""Tiny base models, the offline tokenizer, model loading and prompt encoding."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import T5TokenizerFast

from lora_pipeline.core.datasets.spec import load_spec
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_file
from lora_pipeline.core.models import fullsize
from lora_pipeline.core.models.loading import (
    TINY_MODELS,
    base_model_hash,
    encode_prompts,
    ensure_tiny_model,
    load_base_model,
    resolve_base_model,
    sdxl_add_time_ids,
)
from lora_pipeline.core.models.t5_tokenizer import build_t5_tokenizer
from lora_pipeline.core.models.tiny import STAMP, generate_tiny_model
from lora_pipeline.core.models.tokenizer import WORDS, build_tokenizer
from lora_pipeline_tests.helpers import committed_data

REPO_SPECS = committed_data() / "specs"
PIPELINES = {"tiny-sd": StableDiffusionPipeline, "tiny-sdxl": StableDiffusionXLPipeline, "tiny-flux": FluxPipeline,
             "tiny-flux-schnell": FluxPipeline}
SD_TINY_MODELS = sorted(name for name, family in TINY_MODELS.items() if family in ("sd15", "sdxl"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_model_is_byte_identical_across_generations_and_small(tmp_path, name):
    generate_tiny_model(name, tmp_path / "a")
    generate_tiny_model(name, tmp_path / "b")
    first, second = _tree_hashes(tmp_path / "a"), _tree_hashes(tmp_path / "b")
    assert first == second
    denoiser = "transformer" if TINY_MODELS[name] == "flux1" else "unet"
    components = {"model_index.json", f"{denoiser}/config.json", "vae/config.json", "scheduler/scheduler_config.json"}
    assert components <= set(first)
    if name != "tiny-sd":
        assert {"text_encoder_2/config.json", "tokenizer_2/tokenizer.json"} <= set(first)
    assert sum(p.stat().st_size for p in (tmp_path / "a").rglob("*") if p.is_file()) < 10_000_000


def test_ensure_tiny_model_is_race_safe_reuses_and_replaces_stale(tmp_path):
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: ensure_tiny_model(tmp_path, "tiny-sd"), range(2)))
    assert paths == [tmp_path / "tiny-sd"] * 2
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["tiny-sd"]
    unet = tmp_path / "tiny-sd" / "unet" / "diffusion_pytorch_model.safetensors"
    before = unet.stat().st_mtime_ns
    ensure_tiny_model(tmp_path, "tiny-sd")
    assert unet.stat().st_mtime_ns == before  # reused, not rewritten

    (tmp_path / "tiny-sd" / STAMP).write_text(json.dumps({"generator_version": 0}))
    ensure_tiny_model(tmp_path, "tiny-sd")
    assert json.loads((tmp_path / "tiny-sd" / STAMP).read_text())["generator_version"] > 0
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["tiny-sd"]
    with pytest.raises(UserError, match="unknown tiny model 'tiny-xl'"):
        ensure_tiny_model(tmp_path, "tiny-xl")


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_model_loads_and_generates_through_the_stock_pipeline(tiny_model, name):
    pipe = PIPELINES[name].from_pretrained(tiny_model(name), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "hdaesth, front view, teal body", num_inference_steps=2, height=64, width=64, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(image)).all()


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-flux-schnell"])
def test_tiny_flux_models_have_fluxs_shapes(tiny_model, name):
    pipe = FluxPipeline.from_pretrained(tiny_model(name), local_files_only=True)
    dev = name == "tiny-flux"
    transformer, vae = pipe.transformer.config, pipe.vae.config
    assert transformer.guidance_embeds is dev
    assert (transformer.num_layers, transformer.num_single_layers) == (2, 2)
    modules = dict(pipe.transformer.named_modules())
    assert {"transformer_blocks.1.attn.to_q", "transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.ff.net.2",
            "single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.1.attn.to_k"} <= set(modules)
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert transformer.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert transformer.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert transformer.in_channels == 4 * vae.latent_channels == 64  # 2x2 patches of 16 latent channels
    assert (vae.scaling_factor, vae.shift_factor, vae.use_quant_conv, vae.use_post_quant_conv) == (
        0.3611, 0.1159, False, False)
    assert pipe.vae_scale_factor == 8
    assert pipe.text_encoder_2.config.feed_forward_proj == "gated-gelu"
    assert pipe.tokenizer_2.model_max_length == (512 if dev else 256) and pipe.tokenizer.model_max_length == 77
    scheduler = pipe.scheduler.config
    assert (scheduler.shift, scheduler.use_dynamic_shifting) == ((3.0, True) if dev else (1.0, False))
    if dev:
        assert (scheduler.base_shift, scheduler.max_shift, scheduler.base_image_seq_len,
                scheduler.max_image_seq_len) == (0.5, 1.15, 256, 4096)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-flux-schnell"])
def test_only_tiny_flux_dev_is_conditioned_on_the_guidance_scale(tiny_model, name):
    pipe = FluxPipeline.from_pretrained(tiny_model(name), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images = [pipe("hdaesth, top view", num_inference_steps=1, height=64, width=64, output_type="pt",
                   guidance_scale=scale, generator=torch.Generator().manual_seed(0)).images for scale in (1.0, 6.0)]
    assert torch.equal(*images) is (name == "tiny-flux-schnell")


def test_fullsize_flux_has_the_real_models_parameter_counts():
    """On the meta device: shapes without memory (FLUX.1-dev, T5-XXL encoder, CLIP ViT-L/14 text, FLUX's ae)."""
    modules = {"transformer": fullsize.flux_transformer("meta"), "text_encoder_2": fullsize.t5_encoder("meta"),
               "text_encoder": fullsize.text_encoder("l", "meta"), "vae": fullsize.vae("flux1", "meta")}
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    expected = {"transformer": 11.9e9, "text_encoder_2": 4.76e9, "text_encoder": 123e6, "vae": 84e6}
    assert counts == {name: pytest.approx(count, rel=0.02) for name, count in expected.items()}
    assert modules["transformer"].config.guidance_embeds and modules["vae"].config.latent_channels == 16


def test_tokenizer_keeps_caption_words_whole():
    tok = build_tokenizer()
    ids = tok("hdaesth, three-quarter view, matte sage green body").input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    inner = tokens[1:-1]
    assert inner == ["hdaesth</w>", ",</w>", "three</w>", "-</w>", "quarter</w>", "view</w>", ",</w>",
                     "matte</w>", "sage</w>", "green</w>", "body</w>"]
    assert tok.eos_token_id not in ids[1:-1] and tok.unk_token_id not in ids[1:-1]
    assert tok.model_max_length == 77 and build_tokenizer(pad_token="!").pad_token == "!"


def _spec_words() -> set[str]:
    return {w for path in REPO_SPECS.glob("*.yaml") for tag in load_spec(path).captions.vocabulary
            for w in tag.replace("-", " ").split()}


def test_tokenizer_has_one_token_per_listed_and_spec_vocabulary_word():
    tok = build_tokenizer()
    spec_words = _spec_words()
    assert spec_words, "the committed specs carry a caption vocabulary"
    split = [w for w in sorted(set(WORDS) | spec_words) if len(tok(w).input_ids) != 3]
    assert split == []
    # anything else still encodes (byte-level: nothing is unknown), just in more pieces
    ids = tok("Zyxquv café 42!").input_ids
    assert len(ids) > 6 and tok.eos_token_id not in ids[1:-1]


def test_t5_tokenizer_has_t5s_layout_and_keeps_words_whole(tmp_path):
    tok = build_t5_tokenizer(512)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2) and tok.model_max_length == 512
    ids = tok("hdaesth, three-quarter view, matte sage green body").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["▁hdaesth", ",", "▁three", "-", "quarter", "▁view", ",", "▁matte",
                                              "▁sage", "▁green", "▁body", "</s>"]
    split = [w for w in sorted(set(WORDS) | _spec_words()) if len(tok(w).input_ids) != 2]
    assert split == []
    # anything else in ASCII or Latin-1 still encodes, character by character, never as <unk>
    text = "Zyxquv café 42!"
    ids = tok(text).input_ids
    assert len(ids) > 6 and tok.unk_token_id not in ids and tok.decode(ids, skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    reloaded = T5TokenizerFast.from_pretrained(tmp_path, local_files_only=True)
    assert reloaded("hdaesth, Zyxquv café", padding="max_length", max_length=16).input_ids == tok(
        "hdaesth, Zyxquv café", padding="max_length", max_length=16).input_ids
    assert reloaded.model_max_length == 512 and len(reloaded) == len(tok)


@pytest.mark.parametrize("name", SD_TINY_MODELS)
def test_encode_prompts_matches_the_pipeline(tiny_model, tmp_path, name):
    family = TINY_MODELS[name]
    base = load_base_model(tiny_model(name).parent, name, family)
    assert base.family == family and base.vae_scale_factor == 8
    assert base.latents_scaling_factor == (0.13025 if family == "sdxl" else 0.18215)
    assert base.noise_scheduler.config.clip_sample is False and base.noise_scheduler.config.num_train_timesteps == 1000
    assert not any(p.requires_grad for p in base.unet.parameters())
    prompts = ["hdaesth, front view, teal body", "hdaesth, top view"]
    embeds, pooled = encode_prompts(base, prompts)
    pipe = PIPELINES[name].from_pretrained(tiny_model(name), local_files_only=True)
    if family == "sd15":
        expected, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        assert pooled is None
    else:
        expected, _, expected_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        assert pooled.shape == (2, 32)
        torch.testing.assert_close(pooled, expected_pooled)
        assert embeds.shape == (2, 77, base.unet.config.cross_attention_dim)
    torch.testing.assert_close(embeds, expected)


def test_sdxl_add_time_ids_match_the_pipeline(tiny_model):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model("tiny-sdxl"), local_files_only=True)
    expected = pipe._get_add_time_ids((96, 64), (8, 0), (64, 64), torch.float32, text_encoder_projection_dim=32)
    got = sdxl_add_time_ids((96, 64), (8, 0), (64, 64), batch=3, dtype=torch.float32, device="cpu")
    assert got.shape == (3, 6)
    torch.testing.assert_close(got, expected.repeat(3, 1))


def test_resolve_base_model(tiny_model, tmp_path):
    models = tiny_model("tiny-sd").parent
    assert resolve_base_model(models, "tiny-sd") == str(models / "tiny-sd")
    assert resolve_base_model(tmp_path, str(models / "tiny-sd")) == str((models / "tiny-sd").resolve())
    assert resolve_base_model(models, "tiny-sdxl") == str(models / "tiny-sdxl")  # a folder name under models/
    assert resolve_base_model(tmp_path, "stabilityai/stable-diffusion-xl-base-1.0") == (
        "stabilityai/stable-diffusion-xl-base-1.0"
    )
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(UserError, match="must be a diffusers folder"):
        resolve_base_model(tmp_path, "not-a-model")
    with pytest.raises(UserError, match="neither a local diffusers folder nor a hub id"):
        resolve_base_model(tmp_path, "./missing/model")


def test_load_base_model_refuses_the_wrong_family_and_uncached_hub_ids(tiny_model):
    models = tiny_model("tiny-sdxl").parent
    with pytest.raises(UserError, match="is an SDXL model but the recipe says model_family: sd15"):
        load_base_model(models, "tiny-sdxl", "sd15")
    with pytest.raises(UserError, match="SD 1.x-style model but the recipe says model_family: sdxl"):
        load_base_model(models, "tiny-sd", "sdxl")
    with pytest.raises(UserError, match="cannot load base model"):
        load_base_model(models, "no-such-org/no-such-model", "sd15")


def test_base_model_hash_is_the_unet_weights_hash_and_handles_shards(tiny_model, tmp_path):
    folder = tiny_model("tiny-sd")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert base_model_hash(str(folder)) == sha256_file(weights)
    sharded = tmp_path / "sharded" / "unet"
    sharded.mkdir(parents=True)
    (sharded / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"one")
    (sharded / "diffusion_pytorch_model-00002-of-00002.safetensors").write_bytes(b"two")
    index = {"weight_map": {"a": "diffusion_pytorch_model-00002-of-00002.safetensors",
                            "b": "diffusion_pytorch_model-00001-of-00002.safetensors"}}
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    first = base_model_hash(str(sharded.parent))
    (sharded / "diffusion_pytorch_model-00002-of-00002.safetensors").write_bytes(b"TWO")
    assert base_model_hash(str(sharded.parent)) != first
    with pytest.raises(UserError, match="no U-Net weights found"):
        base_model_hash(str(tmp_path))
