"""Training recipes: `data/recipes/<recipe>.yaml` in kohya's vocabulary, parsed and checked by a typed schema.

docs/fields.md lists every field with its range; it is generated from this class (`make docs`). The recipe is
one flat file, as kohya's arguments are; code reads it by concern through its groups (`Recipe.network`,
`.optimizer_settings`, `.schedule`, `.noise`, `.flow`, `.augmentation`, `.automation`, `.buckets`, `.sampling`;
recipe_groups.py). `fast_path_blockers` is the one answer to whether a run's steps can be captured as CUDA graphs.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import AfterValidator, Field, model_validator
from pydantic.dataclasses import dataclass

from lora_pipeline.core.datasets.buckets import DEFAULT_BUCKETS, BucketSettings
from lora_pipeline.core.datasets.spec import name_glob
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.hashing import sha256_json
from lora_pipeline.core.models.families import FAMILIES as FAMILY_MODULES
from lora_pipeline.core.models.families import model_family
from lora_pipeline.core.models.families.base import DDPM, RECTIFIED_FLOW
from lora_pipeline.core.schema import (
    ADDED_LATER,
    CONFIG,
    NOT_HASHED,
    Bool,
    Float,
    Int,
    Name,
    Text,
    hashed_values,
    non_empty,
    validate,
)
from lora_pipeline.core.training.recipe_groups import (
    AugmentationSettings,
    AutomationSettings,
    FlowSettings,
    GroupView,
    NetworkSettings,
    NoiseSettings,
    OptimizerSettings,
    PredictionType,
    ScheduleSettings,
    TimestepSampling,
    WeightingScheme,
)
from lora_pipeline.core.yamlfile import load_yaml_mapping

if TYPE_CHECKING:  # sampling imports diffusers and torch; reading a recipe must not
    import torch

    from lora_pipeline.core.models.sampling import SamplingSettings

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
GRAPH_SAFE_OPTIMIZERS = ("DAdaptAdamW", "AdamW")  # keep their state on the device and update it in place
EvalWeight = Annotated[Float, Field(ge=-10.0, le=10.0)]
ADAPTIVE = ("DAdaptAdamW", "Prodigy")  # adapt one step size for all LoRA weights
TrainBlocks = Literal["all", "double", "single"]
# The fields only one training objective reads (the family's `objective`): set away from their defaults on a model
# of the other objective they are refused. DoRA and ip_noise_gamma are not implemented for the flow step yet.
OBJECTIVE_ONLY = {
    DDPM: ("v_parameterization", "zero_terminal_snr", "min_snr_gamma", "debiased_estimation_loss", "conv_dim",
           "noise_offset", "multires_noise_iterations", "ip_noise_gamma", "use_dora"),
    RECTIFIED_FLOW: ("timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "model_prediction_type",
                     "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "train_blocks",
                     "t5xxl_max_token_length", "flux_guidance_scale"),
}


FamilyPattern = name_glob("family", first_named="dataset family")


@dataclass(frozen=True, config=CONFIG)
class Recipe:
    """kohya-style training settings. `name` defaults to the file stem and must equal it; `min_bucket_reso` must
    not exceed `max_bucket_reso`."""

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
        "one CUDA GPU and the recipe allows it (DAdaptAdamW or AdamW, no gradient checkpointing, no masks or "
        "regularisation images), else the eager step (the log says why); true: required; false: never",
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
        "sigma", description="FLUX.1: how a step's noise level is drawn (kohya's --timestep_sampling): sigma (the "
        "shifted scheduler's sigmas, at weighting_scheme's density), uniform, sigmoid, shift (sigmoid shifted by "
        "discrete_flow_shift) or flux_shift (shifted by the image size)", json_schema_extra=ADDED_LATER,
    )
    sigmoid_scale: Float = Field(
        1.0, gt=0.0, le=100.0, description="FLUX.1: scale of the normal draw of sigmoid, shift and flux_shift "
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
        0.0, ge=-10.0, le=10.0, description="FLUX.1: mean of the logit_normal density (kohya's --logit_mean)",
        json_schema_extra=ADDED_LATER,
    )
    logit_std: Float = Field(
        1.0, gt=0.0, le=10.0, description="FLUX.1: deviation of the logit_normal density (kohya's --logit_std)",
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
    train_on: tuple[FamilyPattern, ...] = Field(
        (), max_length=100, description="dataset families (names or globs) whose new versions are trained and "
        "evaluated automatically once their blocking checks pass (`make ui`); empty: only when asked",
        json_schema_extra=NOT_HASHED,
    )

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ValueError("min_bucket_reso must not be larger than max_bucket_reso")
        if self.random_crop and self.cache_latents:
            raise ValueError(
                "random_crop needs cache_latents: false (a crop that changes at every step cannot be cached; "
                "kohya refuses it too)"
            )
        if self.cache_latents_to_disk and not self.cache_latents:
            raise ValueError("cache_latents_to_disk needs cache_latents: true")
        for problem in self._conflicts():
            raise ValueError(problem)
        if self.fast_path and (blockers := fast_path_blockers(self)):
            raise ValueError(f"fast_path: true is impossible here: {blockers[0]}")
        return self

    def _conflicts(self) -> list[str]:
        found = []
        if self.conv_alpha is not None and self.conv_dim is None:
            found.append("conv_alpha needs conv_dim")
        if self.text_encoder_lr is not None and self.network_train_unet_only:
            found.append("text_encoder_lr needs network_train_unet_only: false")
        if self.text_encoder_lr is not None and self.optimizer in ADAPTIVE:
            found.append(f"{self.optimizer} adapts one step size for every LoRA weight; leave text_encoder_lr unset")
        relative_step = self.optimizer_settings.relative_step
        needs_constant = self.optimizer == "AdamWScheduleFree" or relative_step
        if needs_constant and self.lr_scheduler != "constant":
            found.append(f"{self.optimizer} sets its own schedule (kohya's "
                         f"{'adafactor' if self.optimizer == 'Adafactor' else 'schedule-free'} mode); "
                         "use lr_scheduler: constant")
        if relative_step and self.lr_warmup_steps:
            found.append("relative-step Adafactor has no warm-up (kohya refuses it too); set lr_warmup_steps: 0")
        if self.zero_terminal_snr and not self.v_parameterization:
            found.append("zero_terminal_snr needs v_parameterization: true (epsilon cannot be predicted at zero SNR)")
        if self.cache_text_encoder_outputs_to_disk and (changing := self._changing_captions()):
            found.append(f"cache_text_encoder_outputs_to_disk needs captions that never change and frozen text "
                         f"encoders (as kohya's): not {', '.join(changing)}")
        if self.sample_every_n_epochs is not None and not self.sample_prompts:
            found.append("sample_every_n_epochs needs sample_prompts")
        return found + self._family_conflicts()

    def _changing_captions(self) -> list[str]:
        """The fields that make a caption's text-encoder outputs change from step to step."""
        changing = {"shuffle_caption": self.shuffle_caption, "caption_dropout_rate": self.caption_dropout_rate,
                    "caption_dropout_every_n_epochs": self.caption_dropout_every_n_epochs,
                    "caption_tag_dropout_rate": self.caption_tag_dropout_rate,
                    "network_train_unet_only": not self.network_train_unet_only}
        return [f"{name}: {str(getattr(self, name)).lower()}" for name, value in changing.items() if value]

    def _family_conflicts(self) -> list[str]:
        """The options of another objective than the family's, set away from their defaults; image sides the
        family's latents cannot take."""
        family = model_family(self.model_family)
        infos = type(self).__pydantic_fields__
        found = [f"{name} is not an option of {family.label} model (model_family: {self.model_family}); leave it "
                 "unset" for objective, names in OBJECTIVE_ONLY.items() if objective != family.objective
                 for name in names if getattr(self, name) != infos[name].default]
        if self.blocks_to_swap > family.max_blocks_to_swap:
            found.append(f"blocks_to_swap must be at most {family.max_blocks_to_swap} for {family.label} model")
        steps = {"resolution": self.resolution, "bucket_reso_steps": self.bucket_reso_steps}
        found += [f"{name} must be a multiple of {family.pixel_multiple} for {family.label} model"
                  for name, value in steps.items() if value % family.pixel_multiple]
        return found

    @property
    def effective_batch_size(self) -> int:
        """Images per optimizer step (kohya's ss_total_batch_size on one device)."""
        return self.train_batch_size * self.gradient_accumulation_steps

    @property
    def kohya_lr_scheduler(self) -> str:
        """kohya's ss_lr_scheduler: relative-step Adafactor replaces the schedule with `adafactor:<lr>`."""
        if self.optimizer_settings.relative_step:
            return f"adafactor:{self.learning_rate}"
        return self.lr_scheduler

    # The fields by concern (recipe_groups.py); the optimizer's group is not `optimizer`, the field naming it.
    network = GroupView(NetworkSettings)
    optimizer_settings = GroupView(OptimizerSettings)
    schedule = GroupView(ScheduleSettings)
    noise = GroupView(NoiseSettings)
    augmentation = GroupView(AugmentationSettings)
    automation = GroupView(AutomationSettings)
    buckets = GroupView(BucketSettings)

    @property
    def flow(self) -> FlowSettings:
        """The rectified-flow objective's settings (FLUX.1; core/training/step/flow.py)."""
        return FlowSettings(self.timestep_sampling, self.sigmoid_scale, self.discrete_flow_shift,
                            self.model_prediction_type, self.weighting_scheme, self.logit_mean, self.logit_std,
                            self.mode_scale, self.flux_guidance_scale)

    @property
    def sampling(self) -> SamplingSettings:
        """What the evaluation grid and the samples while training render from (core/models/sampling.py)."""
        from lora_pipeline.core.models.sampling import SamplingSettings

        return SamplingSettings(self.sample_prompts, self.sample_seed, self.resolution, self.sample_steps,
                                self.guidance_scale)

    def resolved(self) -> dict[str, Any]:
        """Every field with defaults filled in: MLflow params and the recipe hash use this."""
        return asdict(self)

    @property
    def sha256(self) -> str:
        """The hash of `resolved()` without what the fields' marks leave out (core/schema.py): fields added later
        (ADDED_LATER) count only when they differ from their default, so recipes without them, and the LoRA
        files trained from them, keep their hash; `train_on` says when to train, not how: it never counts."""
        values = self.resolved()
        if values["fast_path"] is False:  # unset and false train the same tensors, and hashed alike before
            values["fast_path"] = None
        return sha256_json(hashed_values(Recipe, values))


def fast_path_blockers(recipe: Recipe, device: torch.device | None = None, processes: int = 1) -> list[str]:
    """Why a run of `recipe` cannot replay its steps as captured CUDA graphs (step/fastpath.py); empty: it can.

    The one answer for every caller: the recipe's validation of `fast_path: true` (no device yet) and the DDP
    launcher (with its process count) refuse a required fast path that has a blocker, and
    `fastpath.fast_path_choice` turns an unset one on where there is none. `device`: where an unset fast path
    would run; a required one runs on a CPU too (the recorded step is called again, as the CPU tests do), so the
    refusals leave it out. Masks, class images (per-image loss weights), ip_noise_gamma and gradient accumulation
    (several micro-batches, one graph) are inputs of the captured step like any other; gradient checkpointing
    recomputes without reading the RNG state (run/memory.py's `recompute`), so it is captured too.
    """
    found = []
    if device is not None and device.type != "cuda":
        found.append("the device is not a CUDA GPU")
    if recipe.blocks_to_swap:
        found.append("blocks_to_swap copies block weights between the CPU and the GPU inside the step (host work "
                     "a CUDA graph cannot hold)")
    if recipe.optimizer not in GRAPH_SAFE_OPTIMIZERS:
        found.append(f"{recipe.optimizer} reads values back to the host inside its step (the captured step needs "
                     f"{' or '.join(GRAPH_SAFE_OPTIMIZERS)})")
    if not recipe.network_train_unet_only:  # issue 12's options the captured step does not carry
        found.append("the text encoders train outside the captured U-Net step (network_train_unet_only: false)")
    if processes > 1:
        found.append(f"{processes} processes train together (DDP: a captured CUDA graph holds one process's step, "
                     "not the gradient all-reduce)")
    return found


def parse_recipe(data: dict[str, Any], path: Path) -> Recipe:
    recipe = validate(Recipe, {"name": path.stem, **data}, path)
    if recipe.name != path.stem:
        raise UserError(f"name: '{recipe.name}' must equal the file stem '{path.stem}'", path)
    return recipe


def load_recipe(path: Path) -> Recipe:
    return parse_recipe(load_yaml_mapping(path), path)
