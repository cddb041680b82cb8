"""kohya-format LoRA files: key names, alpha, the SDXL sgm mapping, loading in diffusers, header metadata."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_bytes, sha256_file
from lora_pipeline.core.training.kohya.lora_file import (
    LoraProvenance,
    add_unet_lora,
    build_metadata,
    kohya_state_dict,
    read_lora_metadata,
    save_lora,
    sgm_module_name,
)
from lora_pipeline.core.training.recipe import Recipe

PIPELINES = {"tiny-sd": StableDiffusionPipeline, "tiny-sdxl": StableDiffusionXLPipeline}
FAMILY = {"tiny-sd": "sd15", "tiny-sdxl": "sdxl"}
RANK, ALPHA = 4, 2.0
PROVENANCE = LoraProvenance(
    dataset_version="hand-v1", manifest_root="ab" * 32, spec_sha256="cd" * 32, base_model_source="/models/tiny-sd",
    base_model_hash="ef" * 32, code_commit="0123abc", mlflow_run_id="run42",
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def trained_unet(folder: Path) -> UNet2DConditionModel:
    """The model's U-Net with a LoRA whose up weights are random, so the adapter changes the output."""
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    add_unet_lora(unet, RANK, ALPHA)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return unet.eval()


def unet_inputs(unet: UNet2DConditionModel) -> dict:
    gen = torch.Generator().manual_seed(3)
    cfg = unet.config
    inputs = {
        "sample": torch.randn(2, 4, 8, 8, generator=gen),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 77, cfg.cross_attention_dim, generator=gen),
    }
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, text_dim, generator=gen),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        }
    return inputs


@torch.no_grad()
def unet_out(unet: UNet2DConditionModel, inputs: dict) -> torch.Tensor:
    return unet(**inputs).sample


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_kohya_file_loads_in_diffusers_with_the_same_effect(tiny_model, tmp_path, name):
    folder = tiny_model(name)
    unet = trained_unet(folder)
    tensors = kohya_state_dict(unet, FAMILY[name], ALPHA)
    path = tmp_path / "lora.safetensors"
    digest = save_lora(path, tensors, {"ss_network_dim": str(RANK)})
    assert digest == sha256_file(path)

    keys = list(safetensors.torch.load_file(path))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert set(keys) == {f"{m}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert {tensors[f"{m}.alpha"].item() for m in modules} == {ALPHA}
    if name == "tiny-sdxl":
        assert all(m.split("_")[2] in ("input", "middle", "output") for m in modules)
        assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q" in modules  # down_blocks.1.attentions.0
        assert "lora_unet_middle_block_1_proj_in" in modules
        assert "lora_unet_output_blocks_5_1_transformer_blocks_0_ff_net_2" in modules  # up_blocks.1.attentions.2
        assert not any("down_blocks" in m or "up_blocks" in m or "mid_block" in m for m in modules)
    else:
        assert "lora_unet_down_blocks_0_attentions_0_proj_in" in modules
        assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0" in modules
        assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].ndim == 4  # 1x1 conv

    inputs = unet_inputs(unet)
    expected = unet_out(unet, inputs)
    pipe = PIPELINES[name].from_pretrained(folder, local_files_only=True)
    base = unet_out(pipe.unet, inputs)
    assert (expected - base).abs().max() > 1e-2  # the adapter really changes the output
    pipe.load_lora_weights(path)
    torch.testing.assert_close(unet_out(pipe.unet, inputs), expected, atol=1e-5, rtol=1e-5)


def test_sgm_names_invert_diffusers_own_mapping(tiny_model):
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    unet = UNet2DConditionModel.from_pretrained(tiny_model("tiny-sdxl"), subfolder="unet")
    names = [n for n, _ in unet.named_modules() if n.endswith("attn1.to_q") or n.endswith(".proj_out")]
    sgm = {"lora_unet_" + sgm_module_name(n, 2).replace(".", "_") + ".lora_down.weight": n for n in names}
    back = _maybe_map_sgm_blocks_to_diffusers({k: torch.zeros(1) for k in sgm}, unet.config)
    renames = {"input_blocks": "down_blocks", "middle_block": "mid_block", "output_blocks": "up_blocks"}
    mapped = [k.split(".")[0] for k in back]  # block indices are mapped here; the words in _convert_unet_lora_key
    for sgm_word, diffusers_word in renames.items():
        mapped = [k.replace(sgm_word, diffusers_word) for k in mapped]
    assert sorted(mapped) == sorted("lora_unet_" + n.replace(".", "_") for n in names)
    # SDXL's real layout: down_blocks.2.attentions.1 is input block 8, up_blocks.0.attentions.2 output block 2
    assert sgm_module_name("down_blocks.2.attentions.1.proj_in", 2) == "input_blocks.8.1.proj_in"
    assert sgm_module_name("up_blocks.0.attentions.2.proj_in", 2) == "output_blocks.2.1.proj_in"
    assert sgm_module_name("down_blocks.0.resnets.1.conv1", 2) == "input_blocks.2.0.in_layers.2"
    assert sgm_module_name("mid_block.resnets.1.time_emb_proj", 2) == "middle_block.2.emb_layers.1"
    assert sgm_module_name("down_blocks.1.downsamplers.0.conv", 2) == "input_blocks.6.0.op"
    with pytest.raises(ValueError, match="that diffusers and ComfyUI map back"):
        sgm_module_name("up_blocks.2.upsamplers.0.conv", 2)  # a level without attention: no sgm slot 2


def test_kohya_state_dict_refuses_an_alpha_other_than_the_adapters(tiny_model):
    unet = trained_unet(tiny_model("tiny-sd"))
    with pytest.raises(ValueError, match="is not 4.0"):
        kohya_state_dict(unet, "sd15", 4.0)
    with pytest.raises(ValueError, match="no LoRA adapter named 'other'"):
        kohya_state_dict(unet, "sd15", ALPHA, adapter_name="other")


def test_save_lora_adds_addnet_hashes_and_is_atomic(tmp_path):
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.alpha": torch.tensor(1.0)}
    path = tmp_path / "sub" / "a.safetensors"
    save_lora(path, tensors, {"ss_seed": "1", "modelspec.title": "a"})
    meta = read_lora_metadata(path)
    raw = path.read_bytes()
    data_start = 8 + int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == sha256_bytes(raw[data_start:])  # the tensors' bytes, not the header
    assert len(meta["sshs_legacy_hash"]) == 8
    save_lora(path, tensors, {"ss_seed": "1", "modelspec.title": "renamed"})
    assert read_lora_metadata(path)["sshs_model_hash"] == meta["sshs_model_hash"]
    assert [p.name for p in path.parent.iterdir()] == ["a.safetensors"]  # no temp file left behind
    with pytest.raises(TypeError, match="must be strings: ss_epoch"):
        save_lora(path, tensors, {"ss_epoch": 3})


def test_read_lora_metadata_refuses_what_is_not_safetensors(tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("hello, this is not a tensor file")
    with pytest.raises(UserError, match=r"notes.safetensors: not a safetensors file"):
        read_lora_metadata(bad)
    with pytest.raises(UserError, match="file not found"):
        read_lora_metadata(tmp_path / "missing.safetensors")


def test_build_metadata_writes_kohya_modelspec_and_provenance_keys():
    recipe = Recipe(name="demo-tiny", base_model="tiny-sdxl", model_family="sdxl", resolution=64, network_dim=4,
                    network_alpha=2.0, epochs=4, optimizer="DAdaptAdamW", min_snr_gamma=None)
    meta = build_metadata(
        recipe=recipe, provenance=PROVENANCE, epoch=3, steps=30, max_train_steps=40, num_train_images=100,
        num_batches_per_epoch=10, tag_frequency={"10_hdaesth": {"hdaesth": 10, "front view": 3}},
        dataset_dirs={"10_hdaesth": {"n_repeats": 10, "img_count": 10}}, training_started_at=1_700_000_000.5,
    )
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert (meta["ss_epoch"], meta["ss_num_epochs"], meta["ss_steps"]) == ("3", "4", "30")
    assert meta["ss_output_name"] == "hand-v1-demo-tiny"
    assert json.loads(meta["ss_tag_frequency"]) == {"10_hdaesth": {"hdaesth": 10, "front view": 3}}
    assert json.loads(meta["ss_dataset_dirs"])["10_hdaesth"]["n_repeats"] == 10
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_shuffle_caption"] == "True"
    assert meta["ss_min_snr_gamma"] == "None" and meta["ss_sd_model_name"] == "tiny-sdxl"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "64x64" and meta["modelspec.date"].startswith("2023-11-14T22:13:20")
    assert meta["lora_pipeline.recipe_sha256"] == recipe.sha256
    assert json.loads(meta["lora_pipeline.recipe_resolved"])["network_alpha"] == 2.0
    assert (meta["lora_pipeline.manifest_root"], meta["lora_pipeline.mlflow_run_id"]) == ("ab" * 32, "run42")
    assert meta["lora_pipeline.epoch"] == "3" and meta["lora_pipeline.code_commit"] == "0123abc"
    sd15 = build_metadata(
        recipe=Recipe(name="r", base_model="tiny-sd"), provenance=PROVENANCE, epoch=1, steps=1, max_train_steps=1,
        num_train_images=1, num_batches_per_epoch=1, tag_frequency={}, dataset_dirs={}, training_started_at=0.0,
    )
    assert sd15["ss_base_model_version"] == "sd_v1" and sd15["modelspec.implementation"] == "diffusers"
    assert sd15["modelspec.architecture"] == "stable-diffusion-v1/lora"


# kohya sd-scripts train_network.py (train(), the metadata dict, the dataset branch without a dataset config, and
# save_model) writes these keys into every file, each str() of the value; the format each value must have:
INT, FLOAT, BOOL = r"-?\d+", r"-?\d+(\.\d+)?(e-?\d+)?", r"True|False"


def _opt(pattern: str) -> str:
    return f"{pattern}|None"


KOHYA_ALWAYS = {
    "ss_session_id": INT, "ss_training_started_at": FLOAT, "ss_output_name": r".+", "ss_learning_rate": FLOAT,
    "ss_text_encoder_lr": _opt(FLOAT), "ss_unet_lr": _opt(FLOAT), "ss_num_train_images": INT,
    "ss_num_validation_images": INT, "ss_num_reg_images": INT, "ss_num_batches_per_epoch": INT,
    "ss_num_epochs": INT, "ss_gradient_checkpointing": BOOL, "ss_gradient_accumulation_steps": INT,
    "ss_max_train_steps": INT, "ss_lr_warmup_steps": INT, "ss_lr_scheduler": r"[\w:.]+",
    "ss_network_module": r"[\w.]+", "ss_network_dim": INT, "ss_network_alpha": FLOAT,
    "ss_network_dropout": _opt(FLOAT), "ss_mixed_precision": r"no|fp16|bf16", "ss_full_fp16": BOOL, "ss_v2": BOOL,
    "ss_base_model_version": r"[\w.-]+", "ss_clip_skip": _opt(INT), "ss_max_token_length": _opt(INT),
    "ss_cache_latents": BOOL, "ss_seed": INT, "ss_lowram": BOOL, "ss_noise_offset": _opt(FLOAT),
    "ss_multires_noise_iterations": _opt(INT), "ss_multires_noise_discount": FLOAT,
    "ss_adaptive_noise_scale": _opt(FLOAT), "ss_zero_terminal_snr": BOOL, "ss_training_comment": r".*",
    "ss_sd_scripts_commit_hash": r".+", "ss_optimizer": r"[a-z_][\w]*(\.\w+)+\.[A-Z]\w*(\(.*\))?",
    "ss_max_grad_norm": FLOAT, "ss_caption_dropout_rate": FLOAT, "ss_caption_dropout_every_n_epochs": _opt(INT),
    "ss_caption_tag_dropout_rate": FLOAT, "ss_face_crop_aug_range": r"None|\(.*\)", "ss_prior_loss_weight": FLOAT,
    "ss_min_snr_gamma": _opt(FLOAT), "ss_scale_weight_norms": _opt(FLOAT), "ss_ip_noise_gamma": _opt(FLOAT),
    "ss_debiased_estimation": BOOL, "ss_noise_offset_random_strength": BOOL,
    "ss_ip_noise_gamma_random_strength": BOOL, "ss_loss_type": r"l1|l2|huber|smooth_l1",
    "ss_huber_schedule": r"snr|exponential|constant", "ss_huber_scale": FLOAT, "ss_huber_c": FLOAT,
    "ss_fp8_base": BOOL, "ss_fp8_base_unet": BOOL, "ss_validation_seed": _opt(INT), "ss_validation_split": FLOAT,
    "ss_max_validation_steps": _opt(INT), "ss_validate_every_n_epochs": _opt(INT),
    "ss_validate_every_n_steps": _opt(INT), "ss_resize_interpolation": _opt(r"\w+"),
    "ss_batch_size_per_device": INT, "ss_total_batch_size": INT, "ss_resolution": r"\(\d+, \d+\)",
    "ss_color_aug": BOOL, "ss_flip_aug": BOOL, "ss_random_crop": BOOL, "ss_shuffle_caption": BOOL,
    "ss_enable_bucket": BOOL, "ss_bucket_no_upscale": BOOL, "ss_min_bucket_reso": INT, "ss_max_bucket_reso": INT,
    "ss_keep_tokens": INT, "ss_dataset_dirs": "json", "ss_reg_dataset_dirs": "json", "ss_tag_frequency": "json",
    "ss_bucket_info": "json", "ss_sd_model_name": r".+", "ss_training_finished_at": FLOAT, "ss_steps": INT,
    "ss_epoch": INT,
}


def test_every_key_kohya_always_writes_is_there_in_kohyas_format():
    recipe = Recipe(name="r", base_model="tiny-sd", resolution=64, optimizer="DAdaptAdamW")
    buckets = {"buckets": {3: {"resolution": (64, 48), "count": 4}}, "mean_img_ar_error": 0.05}
    meta = build_metadata(
        recipe=recipe, provenance=PROVENANCE, epoch=2, steps=8, max_train_steps=16, num_train_images=8,
        num_batches_per_epoch=4, tag_frequency={"2_trg": {"trg": 4}}, dataset_dirs={"2_trg": {"n_repeats": 2,
        "img_count": 4}}, training_started_at=1_700_000_000.5, training_finished_at=1_700_000_123.25,
        num_validation_images=2, bucket_info=buckets,
    )
    for key, pattern in KOHYA_ALWAYS.items():
        assert key in meta, key
        if pattern == "json":
            json.loads(meta[key])
        else:
            assert re.fullmatch(pattern, meta[key]), (key, meta[key])
    assert meta["ss_optimizer"] == "dadaptation.dadapt_adam.DAdaptAdam(decouple=True,weight_decay=0.01)"
    assert (meta["ss_training_finished_at"], meta["ss_num_validation_images"]) == ("1700000123.25", "2")
    assert json.loads(meta["ss_bucket_info"]) == {"buckets": {"3": {"resolution": [64, 48], "count": 4}},
                                                  "mean_img_ar_error": 0.05}
    assert (meta["ss_max_grad_norm"], meta["ss_clip_skip"], meta["ss_lowram"]) == ("1.0", "None", "False")
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.implementation_version"] == "lora-pipeline/0123abc"
    # one session id per run: the same for every epoch of it, another for another run
    again = build_metadata(recipe=recipe, provenance=PROVENANCE, epoch=1, steps=4, max_train_steps=16,
                           num_train_images=8, num_batches_per_epoch=4, tag_frequency={}, dataset_dirs={},
                           training_started_at=1_700_000_000.5)
    other = build_metadata(recipe=recipe, provenance=replace(PROVENANCE, mlflow_run_id="run43"), epoch=1, steps=4,
                           max_train_steps=16, num_train_images=8, num_batches_per_epoch=4, tag_frequency={},
                           dataset_dirs={}, training_started_at=1_700_000_000.5)
    assert again["ss_session_id"] == meta["ss_session_id"] != other["ss_session_id"]
    assert 0 <= int(meta["ss_session_id"]) < 2**32


def test_the_addnet_hashes_of_a_saved_file_are_kohyas_without_a_second_serialization(tmp_path):
    """save_lora computes sshs_* from the one serialization (the ss_-only file's header length stands in for
    the file itself): the same hashes as kohya's way, `addnet_hashes`, for tensors under and over the legacy
    hash's 1 MiB offset and metadata with escapes, controls and non-ASCII characters."""
    from lora_pipeline.core.training.kohya.lora_file import addnet_hashes, save_lora

    nasty = "".join(chr(c) for c in range(0, 0x80)) + "é中🙂\u2028\\\"'"
    for numel in (16, 300_000, 2_000_000):
        tensors = {"lora_unet_a.lora_down.weight": torch.arange(numel, dtype=torch.float32),
                   "lora_unet_a.alpha": torch.tensor(4.0, dtype=torch.float16)}
        metadata = {"ss_network_dim": "4", "ss_tag_frequency": nasty * 3, "modelspec.title": nasty,
                    "lora_pipeline.code_commit": "x" * (numel // 1000)}
        path = tmp_path / f"{numel}.safetensors"
        sha = save_lora(path, tensors, metadata)
        written = read_lora_metadata(path)
        expected = addnet_hashes(tensors, metadata)
        assert {k: written[k] for k in expected} == expected, numel
        assert sha == sha256_bytes(path.read_bytes())
        assert {k: v for k, v in written.items() if not k.startswith("sshs_")} == metadata
        assert save_lora(path, tensors, metadata) == sha  # the same file again: left alone
