"""The recipe's fields: `data/recipes/<recipe>.yaml` in kohya's vocabulary, each with its type, default, range and
description (docs/fields.md is generated from them, `make docs`).

`RecipeFields` is only the typed fields (those of the adapter beyond a plain LoRA are adapter_fields.py's);
recipe.py's `Recipe` adds what is read from them (the groups, the hash) and the checks of their combinations
(recipe_checks.py). The checks take a `RecipeFields` so that they need not import the class they validate.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, Field
from pydantic.dataclasses import dataclass

from lora_pipeline.core.datasets.buckets import DEFAULT_BUCKETS
from lora_pipeline.core.datasets.spec import name_glob
from lora_pipeline.core.models.families import FAMILIES as FAMILY_MODULES
from lora_pipeline.core.schema import (
    ADDED_LATER,
    CONFIG,
    NOT_HASHED,
    Bool,
    Float,
    Int,
    Name,
    Text,
    non_empty,
)
from lora_pipeline.core.training.adapter_fields import AdapterFields
from lora_pipeline.core.training.recipe_groups import (
    HuberSchedule,
    LossType,
    PredictionType,
    TimestepSampling,
    WeightingScheme,
)

MAX_RESOLUTION = 2048  # the square side: buckets hold at most MAX_RESOLUTION**2 (about 4.2 megapixels)
MAX_BUCKET_SIDE = 4096
MAX_SEED = 2**32 - 1

Family = Literal[tuple(FAMILY_MODULES)]  # type: ignore[valid-type]  # the families of core/models/families/
OptimizerName = Literal["DAdaptAdamW", "AdamW", "AdamW8bit", "Prodigy", "Lion", "Adafactor", "AdamWScheduleFree"]
SchedulerName = Literal[
    "constant", "cosine", "linear", "constant_with_warmup", "cosine_with_restarts", "polynomial"
]
Precision = Literal["no", "fp16", "bf16"]
FAMILIES, OPTIMIZERS = get_args(Family), get_args(OptimizerName)
SCHEDULERS, PRECISIONS = get_args(SchedulerName), get_args(Precision)
EvalWeight = Annotated[Float, Field(ge=-10.0, le=10.0)]
TrainBlocks = Literal["all", "double", "single"]
# kohya's --optimizer_args values (ast.literal_eval of key=value): a flag, a number or a tuple of numbers (betas)
OptimizerArg = Bool | Int | Float | tuple[Float, ...]

FamilyPattern = name_glob("family", first_named="dataset family")


@dataclass(frozen=True, config=CONFIG)
class _BaseFields:
    """The recipe fields that come before adapter_fields.py's `AdapterFields` (the order of docs/fields.md)."""

    name: Name = Field(
        description="the recipe name; must equal the file stem", json_schema_extra={"default_text": "the file stem"}
    )
    base_model: Text = Field(
        min_length=1, max_length=1000,
        description="a local diffusers folder, a hub id already in the local cache, or `tiny-sd` / `tiny-sdxl`",
    )
    model_family: Family = Field("sd15", description="the base model's architecture")
    resolution: Int = Field(
        DEFAULT_BUCKETS.resolution, ge=64, le=MAX_RESOLUTION, multiple_of=8,
        description="training side in px; buckets keep the area at most resolution²",
    )
    resolutions: tuple[Annotated[Int, Field(ge=64, le=MAX_RESOLUTION, multiple_of=8)], ...] = Field(
        (), max_length=8, description="multi-resolution training (ai-toolkit's resolution list): each image is "
        "trained at every one of these sides each epoch, bucketed per side, its latents cached per side (empty: "
        "`resolution` only; `resolution` stays the side of the evaluation images)", json_schema_extra=ADDED_LATER,
    )
    enable_bucket: Bool = Field(
        DEFAULT_BUCKETS.enable_bucket, description="kohya aspect-ratio buckets (false: every image is square)"
    )
    min_bucket_reso: Int = Field(
        DEFAULT_BUCKETS.min_bucket_reso, ge=8, le=MAX_BUCKET_SIDE, description="shortest bucket side (px)"
    )
    max_bucket_reso: Int = Field(
        DEFAULT_BUCKETS.max_bucket_reso, ge=8, le=MAX_BUCKET_SIDE, description="longest bucket side (px)"
    )
    bucket_reso_steps: Int = Field(
        DEFAULT_BUCKETS.bucket_reso_steps, ge=8, le=1024, multiple_of=8,
        description="bucket sides are multiples of this (px)",
    )
    epochs: Int = Field(20, ge=1, le=10_000, description="passes over the dataset (with its repeats)")
    save_every_n_epochs: Int = Field(1, ge=1, le=10_000, description="write an epoch file every N epochs")
    train_batch_size: Int = Field(1, ge=1, le=1024, description="images per optimizer step")
    network_dim: Int = Field(32, ge=1, le=1024, description="LoRA rank")
    network_alpha: Float = Field(16.0, gt=0.0, le=1024.0, description="LoRA alpha (scale = alpha / dim)")
    conv_dim: Int | None = Field(
        None, ge=1, le=1024,
        description="LoCon: also train the ResNet/down/up-sampler 3x3 convolutions at this rank (kohya's "
        "network_args conv_dim; null: off)", json_schema_extra=ADDED_LATER,
    )
    conv_alpha: Float | None = Field(
        None, gt=0.0, le=1024.0,
        description="alpha of the conv LoRA (kohya's conv_alpha; null: 1.0 when conv_dim is set)",
        json_schema_extra=ADDED_LATER,
    )
    use_dora: Bool = Field(
        False, description="DoRA (weight-decomposed LoRA, peft); written with LyCORIS' dora_scale tensors",
        json_schema_extra=ADDED_LATER,
    )
    network_train_unet_only: Bool = Field(
        True, description="false: also train LoRA on the text encoder(s) (kohya lora_te_ / lora_te1_, lora_te2_)"
    )
    text_encoder_lr: Float | None = Field(
        None, gt=0.0, le=10.0, description="step size of the text-encoder LoRA (null: learning_rate)",
        json_schema_extra=ADDED_LATER,
    )
    optimizer: OptimizerName = Field(
        "DAdaptAdamW", description="DAdaptAdamW and Prodigy adapt the step size (use learning_rate 1.0)"
    )
    learning_rate: Float = Field(1.0, gt=0.0, le=10.0, description="step size (a multiplier for adaptive optimizers)")
    weight_decay: Float = Field(0.01, ge=0.0, le=10.0, description="decoupled weight decay")
    adafactor_relative_step: Bool = Field(
        True, description="Adafactor sets its own step size (kohya's default relative_step=True; learning_rate is "
        "its initial_lr)", json_schema_extra=ADDED_LATER,
    )
    optimizer_args: dict[Annotated[Text, Field(max_length=40)], OptimizerArg] | None = Field(
        None, max_length=32, description="more arguments of the optimizer's constructor, kohya's --optimizer_args as a "
        "mapping (e.g. {betas: [0.9, 0.99], eps: 1e-8, decouple: true, d_coef: 1.0}); a key the optimizer does not "
        "take is refused; weight_decay here replaces the weight_decay field (null: none)",
        json_schema_extra=ADDED_LATER,
    )
    lr_scheduler: SchedulerName = Field(
        "constant", description="learning-rate schedule over all steps"
    )
    lr_warmup_steps: Int = Field(0, ge=0, le=1_000_000, description="steps of linear warm-up")
    lr_scheduler_num_cycles: Int = Field(
        1, ge=1, le=1000, description="hard restarts of cosine_with_restarts", json_schema_extra=ADDED_LATER,
    )
    lr_scheduler_power: Float = Field(
        1.0, gt=0.0, le=100.0, description="power of the polynomial schedule", json_schema_extra=ADDED_LATER,
    )
    max_train_steps: Int | None = Field(
        None, ge=1, le=10_000_000,
        description="stop after this many optimizer steps (saving that step), or after `epochs` if that comes first",
        json_schema_extra=ADDED_LATER,
    )
    save_every_n_steps: Int | None = Field(
        None, ge=1, le=10_000_000, description="also write a -sNNNNNN step file every N optimizer steps",
        json_schema_extra=ADDED_LATER,
    )
    gradient_accumulation_steps: Int = Field(
        1, ge=1, le=1024, description="batches per optimizer step (effective batch = train_batch_size x this)",
        json_schema_extra=ADDED_LATER,
    )
    shuffle_caption: Bool = Field(True, description="shuffle caption tags after the first keep_tokens")
    keep_tokens: Int = Field(1, ge=0, le=1000, description="leading tags that are never shuffled (the trigger)")
    caption_separator: Text = Field(",", min_length=1, max_length=10, description="what separates caption tags")
    mixed_precision: Precision = Field(
        "bf16", description='autocast dtype on a GPU; write "no" in quotes (a bare no is YAML for false)'
    )
    no_half_vae: Bool = Field(
        False, description="encode latents with the VAE in float32 (kohya's --no_half_vae). Off: with bf16 mixed "
        "precision on a GPU the VAE encodes in bf16 (kohya's default, about twice as fast); with fp16 it stays "
        "float32 all the same, since the SD and SDXL VAEs overflow in fp16", json_schema_extra=ADDED_LATER,
    )
    gradient_checkpointing: Bool = Field(False, description="recompute activations to save GPU memory")
    fp8_base: Bool = Field(
        False, description="store the frozen denoiser's Linear weights as float8 (e4m3fn), computed in the "
        "training dtype (kohya's --fp8_base): about half the memory of bf16 weights", json_schema_extra=ADDED_LATER,
    )
    blocks_to_swap: Int = Field(
        0, ge=0, le=1000, description="FLUX.1: transformer blocks whose frozen weights stay on the CPU and move to "
        "the GPU only while they run, forward and backward (kohya's --blocks_to_swap; 0: off)",
        json_schema_extra=ADDED_LATER,
    )
    cache_latents: Bool = Field(True, description="encode every image once before training")
    min_snr_gamma: Float | None = Field(None, gt=0.0, le=1000.0, description="Min-SNR loss weighting (off when null)")
    noise_offset: Float = Field(0.0, ge=0.0, le=1.0, description="offset noise strength")
    multires_noise_iterations: Int | None = Field(
        None, ge=1, le=100, description="multi-resolution (pyramid) noise levels (null: off)",
        json_schema_extra=ADDED_LATER,
    )
    multires_noise_discount: Float = Field(
        0.3, gt=0.0, le=1.0, description="weight decay per pyramid level", json_schema_extra=ADDED_LATER,
    )
    ip_noise_gamma: Float | None = Field(
        None, gt=0.0, le=1.0, description="input perturbation noise strength (null: off)",
        json_schema_extra=ADDED_LATER,
    )
    zero_terminal_snr: Bool = Field(
        False, description="rescale the noise schedule to zero SNR at the last timestep (needs v_parameterization)",
        json_schema_extra=ADDED_LATER,
    )
    debiased_estimation_loss: Bool = Field(
        False, description="weight the loss by 1/sqrt(SNR)", json_schema_extra=ADDED_LATER,
    )
    v_parameterization: Bool = Field(
        False, description="train v-prediction (false: the base model's own prediction type)",
        json_schema_extra=ADDED_LATER,
    )
    # kohya's timestep bounds and loss function (issue 25); step/loss.py, noise.py
    min_timestep: Int | None = Field(
        None, ge=0, le=999, description="smallest drawn DDPM timestep (kohya's --min_timestep; null: 0)",
        json_schema_extra=ADDED_LATER,
    )
    max_timestep: Int | None = Field(
        None, ge=1, le=1000, description="timesteps are drawn below this one (kohya's --max_timestep; null: the "
        "schedule's 1000); equal to min_timestep: every step at that timestep", json_schema_extra=ADDED_LATER,
    )
    loss_type: LossType = Field(
        "l2", description="the loss against the target (kohya's --loss_type): l2 (MSE), l1, huber (2c(sqrt(r^2 + "
        "c^2) - c): r^2 for small residuals r, linear for large) or smooth_l1 (2(sqrt(r^2 + c^2) - c))",
        json_schema_extra=ADDED_LATER,
    )
    huber_schedule: HuberSchedule = Field(
        "snr", description="the threshold c of huber and smooth_l1 per timestep t (kohya's --huber_schedule): snr "
        "((1 - huber_c) / (1 + sigma_t)^2 + huber_c; DDPM only), exponential (huber_scale x huber_c^(t/1000)) or "
        "constant (huber_scale x huber_c)", json_schema_extra=ADDED_LATER,
    )
    huber_c: Float = Field(
        0.1, gt=0.0, le=1.0, description="the Huber threshold of huber_schedule (kohya's --huber_c)",
        json_schema_extra=ADDED_LATER,
    )
    huber_scale: Float = Field(
        1.0, gt=0.0, le=100.0, description="scale of the exponential and constant Huber thresholds (kohya's "
        "--huber_scale)", json_schema_extra=ADDED_LATER,
    )
    seed: Int = Field(42, ge=0, le=MAX_SEED, description="seed of initialisation, shuffling and noise")
    sample_prompts: tuple[Text, ...] = Field((), max_length=100, description="prompts of the evaluation grid")
    sample_every_n_epochs: Int | None = Field(
        None, ge=1, le=10_000,
        description="render sample_prompts with the current LoRA at weight 1.0 every N epochs (null: off)",
        json_schema_extra=ADDED_LATER,
    )
    sample_steps: Int = Field(20, ge=1, le=1000, description="denoising steps per evaluation image")
    sample_seed: Int = Field(1234, ge=0, le=MAX_SEED, description="seed of evaluation images (+ prompt index)")
    guidance_scale: Float = Field(7.0, ge=0.0, le=100.0, description="classifier-free guidance of evaluation images")
    eval_weights: Annotated[tuple[EvalWeight, ...], AfterValidator(non_empty)] = Field(
        (0.6, 0.8, 1.0, 1.2), max_length=32, description="LoRA weights of the evaluation grid columns (non-empty)"
    )
    eval_max_epochs: Int = Field(
        0, ge=0, le=10_000, description="0: evaluate every saved epoch; N: an even subset of N epochs"
    )
    validation_split: Float = Field(0.1, ge=0.0, lt=1.0, description="share of images held out for validation loss")
    fast_path: Bool | None = Field(
        None, description="replay each training step as a CUDA graph, one per batch shape. Unset: on when training on "
        "one CUDA GPU and the recipe allows it (DAdaptAdamW, AdamW, Prodigy or AdamW8bit, no blocks_to_swap, no lr "
        "weights or LoRA dropout), "
        "else the eager step (the log says why); true: required; false: never",
        json_schema_extra=ADDED_LATER,
    )
    # Data-side options (issue 11), kohya's names and semantics; see caption_shuffle.py, augment.py, latent_cache.py.
    caption_dropout_rate: Float = Field(
        0.0, ge=0.0, le=1.0, description="chance that a caption is replaced by the empty caption at a step",
        json_schema_extra=ADDED_LATER,
    )
    caption_dropout_every_n_epochs: Int = Field(
        0, ge=0, le=10_000, description="every Nth epoch trains on empty captions (0: never)",
        json_schema_extra=ADDED_LATER,
    )
    caption_tag_dropout_rate: Float = Field(
        0.0, ge=0.0, le=1.0, description="chance that each tag after the first keep_tokens is left out at a step",
        json_schema_extra=ADDED_LATER,
    )
    flip_aug: Bool = Field(
        False, description="mirror each image left-right with chance 1/2 at each step", json_schema_extra=ADDED_LATER,
    )
    random_crop: Bool = Field(
        False, description="crop at a random place instead of the center (needs cache_latents: false, as in kohya)",
        json_schema_extra=ADDED_LATER,
    )
    cache_latents_to_disk: Bool = Field(
        False, description="keep cached latents under the data root's .cache/latents/, shared by runs and recipes",
        json_schema_extra=ADDED_LATER,
    )
    cache_text_encoder_outputs_to_disk: Bool = Field(
        False, description="keep each caption's text-encoder outputs under the data root's .cache/text/, shared by "
        "runs and recipes (kohya's name; needs captions that never change: shuffle_caption: false, no caption "
        "dropout, frozen text encoders)", json_schema_extra=ADDED_LATER,
    )
    masked_loss: Bool = Field(
        False, description="weight the loss by each image's mask (a spec source's `masks`), at latent resolution",
        json_schema_extra=ADDED_LATER,
    )
    prior_loss_weight: Float = Field(
        1.0, ge=0.0, le=100.0, description="loss weight of regularisation (class) images",
        json_schema_extra=ADDED_LATER,
    )
    # FLUX.1 (model_family: flux1): kohya's flux_train_network.py options of the rectified-flow step (step/flow.py)
    timestep_sampling: TimestepSampling = Field(
        "sigma", description="how a step's noise level is drawn. FLUX.1 (kohya's --timestep_sampling): sigma (the "
        "shifted scheduler's sigmas, at weighting_scheme's density), uniform, sigmoid, shift (sigmoid shifted by "
        "discrete_flow_shift) or flux_shift (shifted by the image size). SD 1.x / SDXL (OneTrainer's "
        "timestep_distribution): sigma or uniform (the schedule's timesteps uniformly, kohya's draw), sigmoid "
        "(sigmoid(sigmoid_scale·N(0,1))) or logit_normal (sigmoid(N(logit_mean, logit_std))), as a share of "
        "[min_timestep, max_timestep)", json_schema_extra=ADDED_LATER,
    )
    sigmoid_scale: Float = Field(
        1.0, gt=0.0, le=100.0, description="scale of the normal draw of sigmoid (and FLUX.1's shift and flux_shift) "
        "sampling (kohya's --sigmoid_scale)", json_schema_extra=ADDED_LATER,
    )
    discrete_flow_shift: Float = Field(
        3.0, gt=0.0, le=100.0, description="FLUX.1: shift of the sigmas of sigma and shift sampling (kohya's "
        "--discrete_flow_shift)", json_schema_extra=ADDED_LATER,
    )
    model_prediction_type: PredictionType = Field(
        "sigma_scaled", description="FLUX.1: how the output is compared with the flow target (kohya's "
        "--model_prediction_type): raw, additive (plus the noisy input) or sigma_scaled (noisy - sigma x output, "
        "weighted by weighting_scheme)", json_schema_extra=ADDED_LATER,
    )
    weighting_scheme: WeightingScheme = Field(
        "none", description="FLUX.1: logit_normal / mode shape the density of sigma sampling, sigma_sqrt / cosmap "
        "weight the loss of sigma_scaled predictions; uniform does what none does (kohya's --weighting_scheme)",
        json_schema_extra=ADDED_LATER,
    )
    logit_mean: Float = Field(
        0.0, ge=-10.0, le=10.0, description="mean of the logit_normal density (FLUX.1's weighting_scheme, the U-Nets' "
        "timestep_sampling; kohya's --logit_mean)",
        json_schema_extra=ADDED_LATER,
    )
    logit_std: Float = Field(
        1.0, gt=0.0, le=10.0, description="deviation of the logit_normal density (FLUX.1's "
        "weighting_scheme, the U-Nets' timestep_sampling; kohya's --logit_std)",
        json_schema_extra=ADDED_LATER,
    )
    mode_scale: Float = Field(
        1.29, ge=0.0, le=10.0, description="FLUX.1: scale of the mode density (kohya's --mode_scale)",
        json_schema_extra=ADDED_LATER,
    )
    flux_guidance_scale: Float = Field(
        1.0, ge=0.0, le=100.0, description="FLUX.1 [dev]: the guidance value its distilled guidance embedding is "
        "given while training (kohya's --guidance_scale; 1.0 as kohya's FLUX guide trains). Not guidance_scale, "
        "which is the classifier-free guidance of evaluation images", json_schema_extra=ADDED_LATER,
    )
    train_blocks: TrainBlocks = Field(
        "all", description="FLUX.1: the transformer blocks that carry the LoRA: all, double (double-stream) or "
        "single (single-stream) (kohya's network_args train_blocks)", json_schema_extra=ADDED_LATER,
    )
    t5xxl_max_token_length: Int | None = Field(
        None, ge=1, le=512, description="FLUX.1: T5 tokens per caption (kohya's --t5xxl_max_token_length; null: "
        "512 for [dev], 256 for [schnell])", json_schema_extra=ADDED_LATER,
    )
    train_t5xxl: Bool = Field(
        False, description="FLUX.1: the T5-XXL text encoder carries a LoRA too, written as `lora_te3_` keys beside "
        "CLIP-L's `lora_te1_` (kohya's network_args train_t5xxl); needs network_train_unet_only: false, and T5's "
        "outputs are then encoded at every step (no text-output cache)", json_schema_extra=ADDED_LATER,
    )


@dataclass(frozen=True, config=CONFIG)
class RecipeFields(AdapterFields, _BaseFields):
    """Every recipe field (recipe.py's `Recipe` is the class that is loaded): the base fields, then the adapter
    fields, then `train_on` (a dataclass orders the fields of its bases from the last base to the first)."""

    train_on: tuple[FamilyPattern, ...] = Field(
        (), max_length=100, description="dataset families (names or globs) whose new versions are trained and "
        "evaluated automatically once their blocking checks pass (`make ui`); empty: only when asked",
        json_schema_extra=NOT_HASHED,
    )
