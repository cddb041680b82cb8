"""FLUX.1: the `flux1` family, [dev] and [schnell] alike (the loaded transformer's `guidance_embeds` tells which).

A FluxTransformer2DModel denoiser in `transformer/`, conditioned on CLIP-L's pooled output and T5-XXL's last hidden
state (as FluxPipeline feeds it), trained on the rectified-flow objective (core/training/step/flux_step.py). Its
LoRA files are kohya's FLUX layout (flux_names.py): `lora_unet_double_blocks_…` / `lora_unet_single_blocks_…`, CLIP-L
as `lora_te1_`, T5 as `lora_te3_`. Text-encoder training (network_train_unet_only: false) trains CLIP-L, and T5 as
well only with `train_t5xxl` (kohya's network_args of that name, off by default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.models.families.base import RECTIFIED_FLOW, ModelFamily

if TYPE_CHECKING:
    import torch

# kohya's t5xxl_max_token_length defaults: 512 tokens for [dev], 256 for [schnell].
T5_MAX_LENGTH = {"dev": 512, "schnell": 256}


def flux_variant(transformer: Any) -> str:
    """"dev" when the transformer embeds the guidance scale, else "schnell"."""
    return "dev" if transformer.config.guidance_embeds else "schnell"


@dataclass(frozen=True)
class Flux1(ModelFamily):
    def is_own_denoiser(self, config: Any) -> bool:
        return "guidance_embeds" in config

    def conditioning(self, outputs: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """T5's last hidden state as the sequence, CLIP's `pooler_output` as the pooled embedding (FluxPipeline)."""
        clip, t5 = outputs
        return t5[0], clip.pooler_output

    def kohya_module_namer(self, denoiser: Any) -> Callable[[str], str]:
        raise ValueError("FLUX.1's kohya modules fuse several diffusers modules: models/lora_layout.py names them "
                         "all at once")

    def token_lengths(self, tokenizers: Sequence[Any], denoiser: Any, t5_max_length: int | None) -> list[int]:
        """CLIP's 77 tokens, and T5's `t5_max_length` (kohya's t5xxl_max_token_length), by default 512 for [dev]
        and 256 for [schnell] as kohya's."""
        return [tokenizers[0].model_max_length, t5_max_length or T5_MAX_LENGTH[flux_variant(denoiser)]]

    def lora_architecture(self, denoiser: Any) -> str:
        return f"flux-1-{flux_variant(denoiser)}/lora"

    def swapped_blocks(self, denoiser: Any, count: int) -> list[Any]:
        """kohya's split (flux_models.Flux.enable_block_swap): count // 2 double-stream blocks and twice the rest
        single-stream ones (a double block is about twice a single one), the last ones of each list."""
        double, single = count // 2, (count - count // 2) * 2
        blocks = denoiser.transformer_blocks, denoiser.single_transformer_blocks
        if double > len(blocks[0]) or single > len(blocks[1]):
            raise UserError(f"blocks_to_swap: {count} swaps {double} double-stream and {single} single-stream "
                            f"blocks; this transformer has {len(blocks[0])} and {len(blocks[1])}")
        return [*blocks[0][len(blocks[0]) - double:], *blocks[1][len(blocks[1]) - single:]]

    def pipeline_call_options(self, denoiser: Any, token_lengths: Sequence[int]) -> dict[str, Any]:
        """FluxPipeline pads T5's input to `max_sequence_length` (default 512): the model's T5 length instead,
        so sampling conditions the transformer as training did."""
        return {"max_sequence_length": token_lengths[1]}

    def guidance_note(self, denoiser: Any, guidance_scale: float) -> str:
        """[dev]: FluxPipeline's `guidance_scale` is the value of the distilled guidance embedding (no second,
        unconditional pass); [schnell] has no guidance input and the pipeline ignores the scale."""
        return f"guidance {guidance_scale:g} (embedded)" if flux_variant(denoiser) == "dev" else "no guidance"


FLUX1 = Flux1(
    name="flux1", label="a FLUX.1", text_encoders=("CLIPTextModel", "T5EncoderModel"), text_prefixes=("lora_te1_",),
    micro_conditioning=False, pipeline="FluxPipeline", pipeline_options=(), kohya_base_model_version="flux1",
    modelspec_architecture="flux-1-dev/lora", modelspec_implementation="https://github.com/black-forest-labs/flux",
    tokenizers=("CLIPTokenizer", "T5Tokenizer"), denoiser_subfolder="transformer",
    denoiser_class="FluxTransformer2DModel", scheduler_class="FlowMatchEulerDiscreteScheduler",
    objective=RECTIFIED_FLOW, pixel_multiple=16, kohya_layout="bfl_fused", t5_prefix="lora_te3_",
    timestep_samplings=("sigma", "uniform", "sigmoid", "shift", "flux_shift"),
    max_blocks_to_swap=35,  # kohya's limit: at least two blocks of each kind stay on the GPU (19 double, 38 single)
)
