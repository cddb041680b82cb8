"""The tiny base models, generated offline: `models/tiny-sd` (SD 1.5-shaped), `models/tiny-sdxl` (SDXL-shaped),
`models/tiny-flux` (FLUX.1 [dev]-shaped) and `models/tiny-flux-schnell` (FLUX.1 [schnell]-shaped).

They are full diffusers folders (model_index.json, unet/ or transformer/, vae/, text_encoder/, tokenizer/,
scheduler/ and, for SDXL and FLUX, text_encoder_2/ and tokenizer_2/), so `StableDiffusionPipeline` /
`StableDiffusionXLPipeline` / `FluxPipeline.from_pretrained(path)` load them exactly like a real local folder. The
weights are random from fixed seeds and the widths tiny; the *shapes* follow the real models, because LoRA key
names, the SDXL sgm block mapping, pooled text embeddings, the added time ids and FLUX's latent packing all
depend on them:

- tiny-sd: one CLIPTextModel, 4 latent channels, VAE factor 8, four U-Net levels (three with cross attention)
  with layers_per_block 2 and `use_linear_projection: false` (proj_in/proj_out are 1x1 convs as in SD 1.5).
- tiny-sdxl: CLIPTextModel + CLIPTextModelWithProjection (pooled text_embeds), addition_embed_type
  "text_time", `use_linear_projection: true`, SDXL's block layout (DownBlock2D + two CrossAttn levels,
  layers_per_block 2, several transformer layers per block) so sgm names map the way diffusers' kohya
  converter expects.
- tiny-flux / tiny-flux-schnell: FluxTransformer2DModel with FLUX's block structure (2 double-stream and 2
  single-stream blocks, so kohya's double_blocks_N / single_blocks_N names exist), 2 heads of 8 (RoPE axes 2+2+4),
  conditioned on a tiny CLIPTextModel's pooled output and a tiny T5 encoder's hidden states; FLUX's VAE latent
  space (16 channels, factor 8, no quant convs, shift and scale); [dev] embeds the guidance scale and uses the
  resolution-shifted flow-matching schedule, [schnell] neither (flux_pipeline.py).

The same code and pinned libraries give byte-identical files. A stamp file records the generator version;
a folder with an older stamp is regenerated.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FluxTransformer2DModel,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.models.flux_pipeline import FLUX_VAE_LATENTS, assemble_flux_pipeline, t5_encoder_config
from lora_pipeline.core.models.t5_tokenizer import t5_vocab
from lora_pipeline.core.models.tokenizer import BOS, EOS, MAX_LENGTH, build_tokenizer, vocab_and_merges

TINY_MODELS = {"tiny-sd": "sd15", "tiny-sdxl": "sdxl", "tiny-flux": "flux1", "tiny-flux-schnell": "flux1"}
GENERATOR_VERSION = 1
STAMP = "lora_pipeline_tiny.json"

# SD 1.5 / SDXL's own noise schedule (scaled_linear 0.00085..0.012 over 1000 steps).
NOISE_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def assemble_pipeline(family: str, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoders: list[CLIPTextModel]
                      ) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The family's stock pipeline around these modules, with its sampling scheduler and the locally built
    tokenizer(s), as a model folder on the hub has it (the tiny and the full-size random models share this)."""
    if family == "sd15":
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoders[0], tokenizer=build_tokenizer(), unet=unet,
            scheduler=PNDMScheduler(**NOISE_BETAS, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], tokenizer=build_tokenizer(),
        tokenizer_2=build_tokenizer(pad_token="!"), unet=unet,
        scheduler=EulerDiscreteScheduler(**NOISE_BETAS, steps_offset=1, timestep_spacing="leading",
                                         prediction_type="epsilon"),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Initialise weights from a fixed seed without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _text_encoder(seed: int, hidden_act: str, with_projection: bool) -> CLIPTextModel:
    vocab, _ = vocab_and_merges()
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH, hidden_act=hidden_act, projection_dim=32,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
    )
    with _seeded(seed):
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    return model.eval()


def _vae(seed: int, scaling_factor: float, **latent_space: Any) -> AutoencoderKL:
    """Four levels, so the latent is 1/8 of the image as in SD and FLUX; 4 latent channels as SD's unless
    `latent_space` (FLUX's) says otherwise, with its shift and without quant convs."""
    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3, out_channels=3, layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16), sample_size=64, scaling_factor=scaling_factor,
            **{"latent_channels": 4, **latent_space},
        ).eval()


def _sd15(out: Path) -> None:
    with _seeded(4):
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 32, 32),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, use_linear_projection=False,
        )
    encoder = _text_encoder(1, "quick_gelu", False)
    assemble_pipeline("sd15", unet.eval(), _vae(3, 0.18215), [encoder]).save_pretrained(out)


def _sdxl(out: Path) -> None:
    text_encoder, text_encoder_2 = _text_encoder(1, "quick_gelu", False), _text_encoder(2, "gelu", True)
    time_embed_dim = 8
    with _seeded(4):
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4), norm_num_groups=8,
            cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
        )
    assemble_pipeline("sdxl", unet.eval(), _vae(3, 0.13025), [text_encoder, text_encoder_2]).save_pretrained(out)


def _flux(out: Path, guidance_embeds: bool) -> None:
    """FLUX.1 [dev] with `guidance_embeds` (the transformer embeds the guidance scale), else [schnell]."""
    text_encoder = _text_encoder(1, "quick_gelu", False)
    with _seeded(2):
        text_encoder_2 = T5EncoderModel(
            t5_encoder_config(len(t5_vocab()), d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2)).eval()
    vae = _vae(3, **FLUX_VAE_LATENTS)
    with _seeded(4):
        transformer = FluxTransformer2DModel(
            in_channels=4 * vae.config.latent_channels, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, axes_dims_rope=(2, 2, 4), joint_attention_dim=text_encoder_2.config.d_model,
            pooled_projection_dim=text_encoder.config.hidden_size, guidance_embeds=guidance_embeds,
        )
    assemble_flux_pipeline(transformer.eval(), vae, text_encoder, text_encoder_2).save_pretrained(out)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-sd": _sd15, "tiny-sdxl": _sdxl, "tiny-flux": partial(_flux, guidance_embeds=True),
    "tiny-flux-schnell": partial(_flux, guidance_embeds=False),
}


def _stamp(name: str) -> dict[str, object]:
    return {"generator_version": GENERATOR_VERSION, "name": name, "family": TINY_MODELS[name]}


def _is_current(folder: Path, name: str) -> bool:
    try:
        return json.loads((folder / STAMP).read_text(encoding="utf-8")) == _stamp(name)
    except (OSError, ValueError):
        return False


def generate_tiny_model(name: str, out: Path) -> None:
    """Write the tiny model `name` into the empty or missing folder `out` (no locking, no renaming)."""
    _BUILDERS[name](out)
    (out / STAMP).write_text(json.dumps(_stamp(name), sort_keys=True) + "\n", encoding="utf-8")


def ensure_tiny_model(models_dir: Path, name: str) -> Path:
    """Return `models_dir/name`, generating it first if it is missing or from an older generator.

    Safe for concurrent callers (pytest workers, Dagster runs): a file lock serialises generation, the
    model is built in a hidden temporary folder beside the target and renamed into place, so a reader
    never sees half a model.
    """
    if name not in TINY_MODELS:
        raise UserError(f"unknown tiny model '{name}'; choose one of {', '.join(TINY_MODELS)}", models_dir)
    final = models_dir / name
    if _is_current(final, name):
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_current(final, name):
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=models_dir))
        try:
            generate_tiny_model(name, tmp)
            if final.is_symlink() or final.exists():  # an older generation: move it aside, then replace it
                stale = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=models_dir))
                final.rename(stale / name)
                shutil.rmtree(stale)
            tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is an ordinary one
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
