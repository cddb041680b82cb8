"""Full-size SD 1.5-, SDXL- and FLUX.1 [dev]-shaped base models with random weights, for GPU drills and benchmarks.

The configurations are the real ones (SD 1.5: U-Net 320/640/1280/1280 with cross-attention 768, CLIP ViT-L/14
text encoder; SDXL base: U-Net 320/640/1280 with transformer depth 1/2/10 and text_time embeddings, CLIP ViT-L/14
plus OpenCLIP ViT-bigG/14 with projection; both with the 4-channel, factor-8 SD VAE; FLUX.1 [dev]: the
FluxTransformer2DModel of 19 double- and 38 single-stream blocks, 24 heads of 128, with guidance embedding, CLIP
ViT-L/14 and T5-XXL's encoder, FLUX's 16-channel VAE), so parameter counts, FLOPs, memory and kernel shapes are
those of a real checkpoint; only the weights are random and the tokenizers are the project's small offline ones
(tokenizer.py, t5_tokenizer.py). `write_fullsize_model` saves a diffusers folder that the stock pipelines and
`loading.load_base_model` read exactly as they read a downloaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from lora_pipeline.core.models.flux_pipeline import FLUX_VAE_LATENTS, assemble_flux_pipeline, t5_encoder_config
from lora_pipeline.core.models.tiny import assemble_pipeline
from lora_pipeline.core.models.tokenizer import BOS, EOS, MAX_LENGTH, vocab_and_merges

UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}
# FLUX.1-dev's transformer/config.json (FluxTransformer2DModel's defaults but for the guidance embedding) and
# google/t5-v1_1-xxl's encoder, FLUX.1's text_encoder_2.
FLUX_TRANSFORMER: dict[str, Any] = dict(
    in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24)
RESOLUTIONS = {"sd15": 512, "sdxl": 1024, "flux1": 1024}
_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
)
VAE_SCALING = {"sd15": 0.18215, "sdxl": 0.13025}
# As the checkpoints are distributed (T5-XXL overflows in float16).
CHECKPOINT_DTYPES = {"sd15": torch.float16, "sdxl": torch.float16, "flux1": torch.bfloat16}
# CLIP ViT-L/14 (SD 1.5's encoder and SDXL's first) and OpenCLIP ViT-bigG/14 (SDXL's second, with projection).
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               hidden_act="quick_gelu", projection_dim=768)
_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
               hidden_act="gelu", projection_dim=1280)


def text_encoder(family_part: str, device: torch.device | str = "cpu") -> CLIPTextModel:
    """"l" (CLIPTextModel, ViT-L/14) or "g" (CLIPTextModelWithProjection, bigG/14), random weights."""
    vocab, _ = vocab_and_merges()
    config = CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=MAX_LENGTH, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS], **(_CLIP_L if family_part == "l" else _CLIP_G),
    )
    with torch.device(device):
        model = (CLIPTextModel if family_part == "l" else CLIPTextModelWithProjection)(config)
    return model.eval()


def t5_encoder(device: torch.device | str = "cpu") -> T5EncoderModel:
    """T5-XXL's encoder (T5 v1.1), random weights."""
    with torch.device(device):
        return T5EncoderModel(t5_encoder_config(**T5_XXL)).eval()


def unet(family: str, device: torch.device | str = "cpu") -> UNet2DConditionModel:
    with torch.device(device):
        return UNet2DConditionModel(**UNET_CONFIGS[family]).eval()


def flux_transformer(device: torch.device | str = "cpu") -> FluxTransformer2DModel:
    with torch.device(device):
        return FluxTransformer2DModel(**FLUX_TRANSFORMER).eval()


def vae(family: str, device: torch.device | str = "cpu") -> AutoencoderKL:
    """SD's VAE for "sd15" and "sdxl" (with their scaling), FLUX's ae (16 latent channels) for "flux1"."""
    if family == "flux1":
        shape = {**_VAE, **FLUX_VAE_LATENTS, "force_upcast": True}
    else:
        shape = {**_VAE, "scaling_factor": VAE_SCALING[family], "force_upcast": family == "sdxl"}
    with torch.device(device):
        return AutoencoderKL(**shape, sample_size=RESOLUTIONS[family]).eval()


def write_fullsize_model(family: str, out: Path, device: torch.device | str = "cpu", seed: int = 0,
                         dtype: torch.dtype | None = None) -> Path:
    """Write a random-weight full-size `family` ("sd15" | "sdxl" | "flux1") diffusers folder to `out`, weights in
    `dtype` (by default as the family's checkpoints are distributed: float16, bfloat16 for FLUX; the VAE stays
    float32). Initialising on a GPU takes seconds, on a CPU minutes (FLUX.1 needs about 48 GB while initialising
    its transformer in float32)."""
    dtype = CHECKPOINT_DTYPES[family] if dtype is None else dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "flux1":
            transformer, autoencoder = flux_transformer(device).to(dtype), vae(family, device)  # drawn in this order
            pipe = assemble_flux_pipeline(transformer, autoencoder, text_encoder("l", device).to(dtype),
                                          t5_encoder(device).to(dtype))
        else:
            denoiser, autoencoder = unet(family, device).to(dtype), vae(family, device)  # drawn in this order
            encoders = [text_encoder(part, device).to(dtype) for part in ("l", "g")[:1 if family == "sd15" else 2]]
            pipe = assemble_pipeline(family, denoiser, autoencoder, encoders)
    pipe.save_pretrained(out)
    return out
