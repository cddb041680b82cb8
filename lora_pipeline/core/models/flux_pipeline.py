"""FLUX.1 diffusers folders: what the tiny FLUX models (tiny.py) and the full-size random one (fullsize.py) share.

Beyond the widths, a folder is FLUX.1's by its flow-matching scheduler configuration, its VAE's latent space (16
channels, no quant convs, latents shifted then scaled), T5 v1.1's gated-GELU encoder for the second text encoder,
and its two tokenizers: the project's offline CLIP one (77 tokens, whose pooled output conditions the transformer)
and the offline T5 one (t5_tokenizer.py). [dev] is guidance-distilled: its transformer embeds the guidance scale
(`guidance_embeds`), [schnell]'s does not, and that is how the assembly tells which of the two it builds.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5Config, T5EncoderModel

from lora_pipeline.core.models.families.flux1 import T5_MAX_LENGTH, flux_variant  # noqa: F401 (re-exported)
from lora_pipeline.core.models.t5_tokenizer import build_t5_tokenizer
from lora_pipeline.core.models.tokenizer import build_tokenizer

# The scheduler_config.json of FLUX.1-dev (resolution-dependent shift) and of FLUX.1-schnell (no shift).
FLUX_SCHEDULERS: dict[str, dict[str, object]] = {
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
}
# FLUX's ae, at any width: the transformer packs 2x2 patches of these 16 channels into 64 input features.
FLUX_VAE_LATENTS: dict[str, object] = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                                            scaling_factor=0.3611, shift_factor=0.1159)


def t5_encoder_config(vocab_size: int, **widths: int) -> T5Config:
    """T5 v1.1's encoder (gated GELU, untied output embedding) at the given widths, with T5's special ids
    (<pad> 0, </s> 1), which the offline T5 tokenizer keeps."""
    return T5Config(vocab_size=vocab_size, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **widths)


def assemble_flux_pipeline(transformer: FluxTransformer2DModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                           text_encoder_2: T5EncoderModel) -> FluxPipeline:
    """The stock FluxPipeline around these modules, with the variant's scheduler and the locally built tokenizers,
    as FLUX.1-dev's or FLUX.1-schnell's folder on the hub has it."""
    variant = flux_variant(transformer)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULERS[variant]), vae=vae, text_encoder=text_encoder,
        tokenizer=build_tokenizer(), text_encoder_2=text_encoder_2,
        tokenizer_2=build_t5_tokenizer(T5_MAX_LENGTH[variant]), transformer=transformer,
    )
