"""FLUX.1 LoRA files in kohya's key layout (core/models/flux_names.py), on tiny diffusers / transformers models with
a peft LoRA (random non-zero up) on every module kohya's FLUX LoRA trains: the keys and shapes, diffusers' FLUX
loader giving every module peft's weight delta, train_blocks, and the exact round trip kohya -> ours -> kohya.

diffusers' kohya FLUX converter splits a single block's `linear1` at FLUX.1's widths ([3072] * 3 + [12288],
hard-coded), so a tiny single block cannot load there: the single blocks load on a full-width one (no double
blocks, ~0.7 GB). Its loader drops T5 (`lora_te3_`) keys, so those are checked by name, shape and the inverse.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from lora_pipeline.core.models.flux_names import (
    CLIP_L,
    T5,
    TRANSFORMER,
    flux_from_kohya,
    flux_kohya_state_dict,
    flux_target_modules,
)
from lora_pipeline.core.models.kohya_names import for_diffusers
from lora_pipeline.core.training.kohya.network import text_targets
from lora_pipeline_tests.helpers import assert_same_deltas, lora_layers

RANK, ALPHA = 2, 3.0
T5_BLOCKS = ("T5Attention", "T5DenseGatedActDense")  # kohya's T5 targets (TEXT_ENCODER_TARGET_REPLACE_MODULE)


def tiny_transformer(**config) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    shape = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4), guidance_embeds=True)
    return FluxTransformer2DModel(**{**shape, **config})


def tiny_clip() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, bos_token_id=0, eos_token_id=2, pad_token_id=1))


def tiny_t5() -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=99, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                   feed_forward_proj="gated-gelu"))


def t5_targets(encoder: T5EncoderModel) -> list[str]:
    return [f"{name}.{child}" for name, block in encoder.named_modules() if type(block).__name__ in T5_BLOCKS
            for child, module in block.named_children() if isinstance(module, torch.nn.Linear)]


def with_lora(model, targets: list[str], component: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Adapter "ours" on the targets, lora_B random (not peft's zeros); its factors under FluxPipeline's names."""
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets)
    if component == TRANSFORMER:
        model.add_adapter(config, adapter_name="ours")
    else:
        inject_adapter_in_model(config, model, adapter_name="ours")
    found = {}
    for name, module in lora_layers(model, "ours"):
        torch.nn.init.normal_(module.lora_B["ours"].weight)
        found[f"{component}.{name}"] = (module.lora_A["ours"].weight.detach().clone(),
                                        module.lora_B["ours"].weight.detach().clone(), ALPHA)
    assert len(found) == len(targets)
    return found


def block_linears(transformer) -> set[str]:
    blocks = ("transformer_blocks.", "single_transformer_blocks.")
    return {name for name, module in transformer.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith(blocks)}


def test_the_kohya_file_has_every_module_in_bfl_names_and_split_qkv_shapes():
    transformer, clip, t5 = tiny_transformer(), tiny_clip(), tiny_t5()
    assert set(flux_target_modules(transformer)) == block_linears(transformer)  # every Linear of every block
    ours = {**with_lora(transformer, flux_target_modules(transformer), TRANSFORMER),
            **with_lora(clip, text_targets(clip), CLIP_L), **with_lora(t5, t5_targets(t5), T5)}
    kohya = flux_kohya_state_dict(ours)

    double = ["img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin",
              "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin"]
    modules = {f"lora_unet_double_blocks_{i}_{name}" for i in range(2) for name in double}
    modules |= {f"lora_unet_single_blocks_{i}_{name}" for i in range(2) for name in ("linear1", "linear2",
                                                                                      "modulation_lin")}
    modules |= {f"lora_te1_text_model_encoder_layers_{i}_{name}" for i in range(2) for name in (
        "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")}
    modules |= {f"lora_te3_encoder_block_{i}_layer_{name}" for i in range(2) for name in (
        "0_SelfAttention_q", "0_SelfAttention_k", "0_SelfAttention_v", "0_SelfAttention_o",
        "1_DenseReluDense_wi_0", "1_DenseReluDense_wi_1", "1_DenseReluDense_wo")}
    assert set(kohya) == {m + s for m in modules for s in (".lora_down.weight", ".lora_up.weight", ".alpha")}

    shapes = {  # (down, up, alpha): d = 16, MLP 64
        "lora_unet_double_blocks_0_img_attn_qkv": ((3 * RANK, 16), (48, 3 * RANK), 3 * ALPHA),
        "lora_unet_double_blocks_1_txt_attn_qkv": ((3 * RANK, 16), (48, 3 * RANK), 3 * ALPHA),
        "lora_unet_double_blocks_0_img_mod_lin": ((RANK, 16), (96, RANK), ALPHA),
        "lora_unet_double_blocks_0_txt_mlp_2": ((RANK, 64), (16, RANK), ALPHA),
        "lora_unet_single_blocks_1_linear1": ((4 * RANK, 16), (112, 4 * RANK), 4 * ALPHA),
        "lora_unet_single_blocks_0_linear2": ((RANK, 80), (16, RANK), ALPHA),
        "lora_unet_single_blocks_0_modulation_lin": ((RANK, 16), (48, RANK), ALPHA),
        "lora_te1_text_model_encoder_layers_1_mlp_fc1": ((RANK, 16), (32, RANK), ALPHA),
        "lora_te3_encoder_block_0_layer_1_DenseReluDense_wo": ((RANK, 32), (16, RANK), ALPHA),
    }
    for module, (down, up, alpha) in shapes.items():
        assert kohya[module + ".lora_down.weight"].shape == down
        assert kohya[module + ".lora_up.weight"].shape == up
        assert kohya[module + ".alpha"].item() == alpha
    # split_qkv: the downs stacked in q, k, v(, mlp) order and up block-diagonal
    q, k, v = (ours[f"transformer.single_transformer_blocks.1.{p}"] for p in ("attn.to_q", "attn.to_k", "attn.to_v"))
    mlp = ours["transformer.single_transformer_blocks.1.proj_mlp"]
    linear1 = "lora_unet_single_blocks_1_linear1"
    assert torch.equal(kohya[linear1 + ".lora_down.weight"], torch.cat([q[0], k[0], v[0], mlp[0]]))
    assert torch.equal(kohya[linear1 + ".lora_up.weight"], torch.block_diag(q[1], k[1], v[1], mlp[1]))

    back = flux_from_kohya(kohya)  # our own file back, exactly (resume)
    assert sorted(back) == sorted(ours)
    for module, (down, up, alpha) in ours.items():
        assert torch.equal(back[module].down, down) and torch.equal(back[module].up, up) and back[module].alpha == alpha


def test_diffusers_loads_double_blocks_and_clip_with_the_trained_deltas():
    transformer, clip, t5 = tiny_transformer(), tiny_clip(), tiny_t5()
    kohya = flux_kohya_state_dict({**with_lora(transformer, flux_target_modules(transformer, "double"), TRANSFORMER),
                                   **with_lora(clip, text_targets(clip), CLIP_L), **with_lora(t5, t5_targets(t5), T5)})
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=clip, tokenizer=None, text_encoder_2=t5,
                        tokenizer_2=None, transformer=transformer)
    pipe.load_lora_weights(for_diffusers(kohya, [clip]), adapter_name="file")
    assert_same_deltas(transformer)
    assert_same_deltas(clip)
    assert lora_layers(t5, "file") == []  # diffusers' FLUX loader drops lora_te3_ keys


def test_diffusers_loads_a_full_width_single_block_with_the_trained_deltas():
    transformer = tiny_transformer(num_layers=0, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                                   axes_dims_rope=(16, 56, 56), guidance_embeds=False)  # FLUX.1's width
    kohya = flux_kohya_state_dict(with_lora(transformer, flux_target_modules(transformer), TRANSFORMER))
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 3072 + 12288, 4 * RANK)
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.load_lora_weights(kohya, adapter_name="file")
    assert_same_deltas(transformer)


def test_train_blocks_single_and_double_give_only_their_blocks():
    transformer = tiny_transformer()
    single, double = flux_target_modules(transformer, "single"), flux_target_modules(transformer, "double")
    assert len(single) == 2 * 6 and all(name.startswith("single_transformer_blocks.") for name in single)
    assert len(double) == 2 * 14 and all(name.startswith("transformer_blocks.") for name in double)
    assert sorted(single + double) == sorted(flux_target_modules(transformer, "all"))
    kohya = flux_kohya_state_dict(with_lora(transformer, single, TRANSFORMER))
    assert all(key.startswith("lora_unet_single_blocks_") for key in kohya) and len(kohya) == 2 * 3 * 3
    with pytest.raises(ValueError, match="train_blocks must be one of all, double, single"):
        flux_target_modules(transformer, "both")


def test_kohya_to_ours_to_kohya_is_exact():
    transformer, clip, t5 = tiny_transformer(), tiny_clip(), tiny_t5()
    kohya = flux_kohya_state_dict({**with_lora(transformer, flux_target_modules(transformer), TRANSFORMER),
                                   **with_lora(clip, text_targets(clip), CLIP_L), **with_lora(t5, t5_targets(t5), T5)})
    # as kohya's own split_qkv writes it: alpha not multiplied, and any float
    kohya["lora_unet_double_blocks_1_img_attn_qkv.alpha"] = torch.tensor(0.1)
    kohya["lora_unet_single_blocks_0_linear1.alpha"] = torch.tensor(7.0)
    again = flux_kohya_state_dict(flux_from_kohya(kohya))
    assert sorted(again) == sorted(kohya)
    for key, tensor in kohya.items():
        assert torch.equal(again[key], tensor), key


def test_a_plain_lora_of_a_fused_linear_splits_to_its_rows_as_diffusers_splits_it():
    """kohya's default (no split_qkv) LoRA of img_attn.qkv: one down, each part its rows of up; same delta."""
    torch.manual_seed(1)
    down, up = torch.randn(RANK, 16), torch.randn(48, RANK)
    kohya = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
             "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
             "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(ALPHA)}
    parts = flux_from_kohya(kohya)
    assert sorted(parts) == [f"transformer.transformer_blocks.0.attn.to_{p}" for p in "kqv"]
    fused = torch.cat([p.up @ p.down * (p.alpha / p.down.shape[0]) for p in
                       (parts[f"transformer.transformer_blocks.0.attn.to_{x}"] for x in "qkv")])
    torch.testing.assert_close(fused, up @ down * (ALPHA / RANK))
    converted = FluxPipeline.lora_state_dict(dict(kohya))
    for name, part in parts.items():
        diffusers_delta = converted[f"{name}.lora_B.weight"] @ converted[f"{name}.lora_A.weight"]
        torch.testing.assert_close(diffusers_delta, part.up @ part.down * (part.alpha / part.down.shape[0]))


def test_modules_that_have_no_kohya_form_are_refused():
    transformer = tiny_transformer()
    ours = with_lora(transformer, flux_target_modules(transformer, "double"), TRANSFORMER)
    without_v = {k: v for k, v in ours.items() if k != "transformer.transformer_blocks.0.attn.to_v"}
    with pytest.raises(ValueError, match=r"double_blocks_0_img_attn_qkv: a fused module needs all its parts, part\(s\) "
                                         r"\[2\] are missing"):
        flux_kohya_state_dict(without_v)
    k_alpha = {**ours, "transformer.transformer_blocks.0.attn.to_k": (*ours[
        "transformer.transformer_blocks.0.attn.to_k"][:2], 2 * ALPHA)}
    with pytest.raises(ValueError, match="img_attn_qkv: the parts of a fused module need one rank and one alpha"):
        flux_kohya_state_dict(k_alpha)
    with pytest.raises(ValueError, match="'transformer.x_embedder' is no module that kohya's FLUX LoRA trains"):
        flux_kohya_state_dict({"transformer.x_embedder": ours["transformer.transformer_blocks.0.ff.net.2"]})
    with pytest.raises(ValueError, match="'lora_unet_final_layer_linear' is no kohya FLUX LoRA module"):
        flux_from_kohya({"lora_unet_final_layer_linear.lora_down.weight": torch.zeros(1, 1)})
    with pytest.raises(ValueError, match="not kohya LoRA tensors: lora_unet_single_blocks_0_linear2.dora_scale"):
        flux_from_kohya({"lora_unet_single_blocks_0_linear2.dora_scale": torch.zeros(1, 1)})
