"""The recipe fields of the adapter beyond a plain LoRA (issue 25): LyCORIS' LoHa / LoKr, an EMA of the weights,
starting from an existing LoRA, kohya's block-wise ranks, alphas and learning rates, and the LoRA dropouts.

`AdapterFields` is one of the bases of recipe_fields.py's `RecipeFields`; its fields follow the base fields there
in the recipe's field order (docs/fields.md).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from pydantic.dataclasses import dataclass

from lora_pipeline.core.schema import ADDED_LATER, CONFIG, Bool, Float, Int, Text
from lora_pipeline.core.training.blocks import LR_PRESET_PATTERN
from lora_pipeline.core.training.recipe_groups import NetworkAlgo

# kohya's block-wise network_args (training/blocks.py) and dropouts
BlockInts = Annotated[tuple[Annotated[Int, Field(ge=0, le=1024)], ...], Field(max_length=25)]
BlockFloats = Annotated[tuple[Annotated[Float, Field(gt=0.0, le=1024.0)], ...], Field(max_length=25)]
LrWeight = Annotated[Float, Field(ge=0.0, le=100.0)]
LrWeights = Annotated[tuple[LrWeight, ...], Field(min_length=1, max_length=12)]
LrPreset = Annotated[Text, Field(pattern=LR_PRESET_PATTERN)]
Dropout = Annotated[Float, Field(ge=0.0, lt=1.0)]


@dataclass(frozen=True, config=CONFIG)
class AdapterFields:
    """The adapter fields of a recipe (recipe_fields.py's `RecipeFields` holds them all)."""

    # LyCORIS' LoHa / LoKr (issue 25; core/models/lycoris.py). The U-Nets' timestep sampling (issue 25 too) reuses
    # recipe_fields.py's fields timestep_sampling, sigmoid_scale, logit_mean and logit_std (step/noise.py)
    network_algo: NetworkAlgo = Field(
        "lora", description="the network trained on the LoRA's modules: lora, loha (LyCORIS' LoHa: ΔW = (w1_a w1_b) "
        "∘ (w2_a w2_b) · alpha/dim) or lokr (LyCORIS' LoKr: ΔW = w1 ⊗ w2, w2 low-rank at dim where it is large); "
        "kohya's --network_module lycoris.kohya with network_args algo=loha|lokr. SD 1.x and SDXL only",
        json_schema_extra=ADDED_LATER,
    )
    lokr_factor: Int = Field(
        -1, ge=-1, le=1024, description="LoKr: the side of the Kronecker product's small factor (LyCORIS' network_args "
        "factor; -1: the most square split of each side)", json_schema_extra=ADDED_LATER,
    )
    # EMA of the LoRA weights and starting from an existing LoRA (issue 25); step/ema.py, run/start_lora.py.
    # The EMA fields are diffusers' EMAModel's (and SimpleTuner's, which trains LoRA with it).
    use_ema: Bool = Field(
        False, description="keep a float32 exponential moving average of the LoRA weights, updated after every "
        "optimizer step; the epoch and step files (and the samples) hold it instead of the raw weights "
        "(SimpleTuner's --use_ema, OneTrainer's ema; header ss_ema)", json_schema_extra=ADDED_LATER,
    )
    ema_decay: Float = Field(
        0.995, gt=0.0, lt=1.0, description="the EMA's largest decay (SimpleTuner's --ema_decay default; diffusers' "
        "EMAModel decay). A step's decay is min(ema_decay, (1 + n) / (10 + n)), or with ema_warmup "
        "min(ema_decay, 1 - (1 + n)^-ema_power), n the EMA updates after ema_update_after_step; n = 0 copies the "
        "weights", json_schema_extra=ADDED_LATER,
    )
    ema_update_after_step: Int = Field(
        0, ge=0, le=10_000_000, description="until this optimizer step the EMA only copies the weights (diffusers' "
        "update_after_step)", json_schema_extra=ADDED_LATER,
    )
    ema_warmup: Bool = Field(
        False, description="diffusers' use_ema_warmup: the decay ramps as 1 - (1 + n)^-ema_power (inv_gamma 1) "
        "instead of (1 + n) / (10 + n)", json_schema_extra=ADDED_LATER,
    )
    ema_power: Float = Field(
        2 / 3, gt=0.0, le=10.0, description="exponent of the ema_warmup ramp (diffusers' power: 2/3 reaches 0.999 "
        "after about 31,000 steps, 3/4 after 10,000)", json_schema_extra=ADDED_LATER,
    )
    from_lora: Annotated[Text, Field(min_length=1, max_length=1000)] | None = Field(
        None, description="start from this LoRA's weights instead of a fresh init (kohya's --network_weights): a "
        "safetensors file (absolute, or relative to the data root) or a LoRA of this pipeline as "
        "`<version>/<recipe>/e<NNN>`. Its family, rank, alpha and modules must be the recipe's; its path and "
        "sha256 go into the header (ss_network_weights) and provenance traces its chain",
        json_schema_extra=ADDED_LATER,
    )
    # kohya's network_args of networks/lora.py (issue 25): block-wise ranks, alphas and learning rates of the SD 1.x
    # and SDXL U-Nets (25 / 23 kohya blocks; training/blocks.py) and the LoRA dropouts (kohya/dropout.py)
    block_dims: BlockInts | None = Field(
        None, description="U-Net LoRA rank per kohya block, 0: none there (25 for SD 1.x: IN00-11, MID, OUT00-11; "
        "23 for SDXL: 0, IN00-08, MID00-02, OUT00-08, OUT; kohya's block_dims, a list here)",
        json_schema_extra=ADDED_LATER)
    block_alphas: BlockFloats | None = Field(
        None, description="alpha per block of block_dims (kohya's block_alphas; null: network_alpha)",
        json_schema_extra=ADDED_LATER)
    conv_block_dims: BlockInts | None = Field(
        None, description="LoCon: rank of the 3x3 convolutions per block, which it turns on (kohya's "
        "conv_block_dims; null: conv_dim)", json_schema_extra=ADDED_LATER)
    conv_block_alphas: BlockFloats | None = Field(
        None, description="alpha per block of conv_block_dims (kohya's conv_block_alphas; null: conv_alpha)",
        json_schema_extra=ADDED_LATER)
    down_lr_weight: LrWeights | LrPreset | None = Field(
        None, description="learning-rate weight of each down block, shallow to deep (12 for SD 1.x, 9 for SDXL; "
        "fewer: the rest 1.0), or a preset cosine/sine/linear/reverse_linear/zeros with an optional +<base> "
        "(kohya's down_lr_weight)", json_schema_extra=ADDED_LATER)
    mid_lr_weight: LrWeight | LrWeights | None = Field(
        None, description="learning-rate weight of the middle block(s) (1 for SD 1.x, 3 for SDXL; kohya's "
        "mid_lr_weight)", json_schema_extra=ADDED_LATER)
    up_lr_weight: LrWeights | LrPreset | None = Field(
        None, description="as down_lr_weight for the up blocks, deep to shallow (kohya's up_lr_weight)",
        json_schema_extra=ADDED_LATER)
    block_lr_zero_threshold: Float = Field(
        0.0, ge=0.0, le=10.0, description="lr weights at or below this are 0, and a block of weight 0 gets no LoRA "
        "(kohya's block_lr_zero_threshold)", json_schema_extra=ADDED_LATER)
    network_dropout: Dropout | None = Field(
        None, description="neuron dropout on each LoRA down projection's output while training (kohya's "
        "--network_dropout; null: off)", json_schema_extra=ADDED_LATER)
    rank_dropout: Dropout | None = Field(
        None, description="chance that each rank of a LoRA is dropped per image while training, the rest scaled up "
        "(kohya's network_args rank_dropout; null: off)", json_schema_extra=ADDED_LATER)
    module_dropout: Dropout | None = Field(
        None, description="chance that a module's whole LoRA is left out of a forward while training (kohya's "
        "network_args module_dropout; null: off)", json_schema_extra=ADDED_LATER)
