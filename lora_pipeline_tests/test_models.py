"""Tiny base models, the offline tokenizer, model loading and prompt encoding."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from lora_pipeline.core.datasets.spec import load_spec
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_file
from lora_pipeline.core.models.loading import (
    TINY_MODELS,
    base_model_hash,
    encode_prompts,
    ensure_tiny_model,
    load_base_model,
    resolve_base_model,
    sdxl_add_time_ids,
)
from lora_pipeline.core.models.tiny import STAMP, generate_tiny_model
from lora_pipeline.core.models.tokenizer import WORDS, build_tokenizer
from lora_pipeline_tests.helpers import committed_data

REPO_SPECS = committed_data() / "specs"
PIPELINES = {"tiny-sd": StableDiffusionPipeline, "tiny-sdxl": StableDiffusionXLPipeline}


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
    assert {"model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"} <= set(first)
    if name == "tiny-sdxl":
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


def test_tokenizer_has_one_token_per_listed_and_spec_vocabulary_word():
    tok = build_tokenizer()
    spec_words = {w for path in REPO_SPECS.glob("*.yaml") for tag in load_spec(path).captions.vocabulary
                  for w in tag.replace("-", " ").split()}
    assert spec_words, "the committed specs carry a caption vocabulary"
    split = [w for w in sorted(set(WORDS) | spec_words) if len(tok(w).input_ids) != 3]
    assert split == []
    # anything else still encodes (byte-level: nothing is unknown), just in more pieces
    ids = tok("Zyxquv café 42!").input_ids
    assert len(ids) > 6 and tok.eos_token_id not in ids[1:-1]


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
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
