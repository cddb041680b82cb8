"""A recipe's fields grouped by the concern that reads them: the network, the optimizer, the learning-rate schedule,
the noise of a step, FLUX.1's rectified-flow objective, the data augmentation, and when to train (automation).

`Recipe.network`, `.optimizer_settings`, `.schedule`, `.noise`, `.flow`, `.augmentation` and `.automation` return
these; each group's fields carry the recipe's field names and are filled from them by name (`GroupView`), but
`FlowSettings.guidance_scale`, which is the recipe's `flux_guidance_scale`. The
image buckets are `core/datasets/buckets.BucketSettings` (the dataset report reads them too) and the sampled
images `core/models/sampling.SamplingSettings`. Code that uses one concern takes its group, not the recipe.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, fields
from typing import Generic, Literal, TypeVar, get_args, overload

from lora_pipeline.core.datasets.snapshot.snapshot_plan import family

G = TypeVar("G")
# the modes of every family; which a family takes: its `timestep_samplings` (recipe_checks.timestep_problems)
TimestepSampling = Literal["sigma", "uniform", "sigmoid", "shift", "flux_shift", "logit_normal"]
NetworkAlgo = Literal["lora", "loha", "lokr"]
PredictionType = Literal["raw", "additive", "sigma_scaled"]
WeightingScheme = Literal["none", "uniform", "sigma_sqrt", "logit_normal", "mode", "cosmap"]
LossType = Literal["l2", "l1", "huber", "smooth_l1"]
HuberSchedule = Literal["snr", "exponential", "constant"]
OptimizerArgValue = bool | int | float | tuple[float, ...]


class GroupView(Generic[G]):
    """A read-only attribute of a recipe: its group `kind`, a dataclass whose fields are recipe fields."""

    def __init__(self, kind: type[G]) -> None:
        self.kind = kind

    @overload
    def __get__(self, instance: None, owner: type) -> GroupView[G]: ...
    @overload
    def __get__(self, instance: object, owner: type) -> G: ...
    def __get__(self, instance: object | None, owner: type) -> GroupView[G] | G:
        if instance is None:  # read on the class
            return self
        return read_group(self.kind, instance)


def read_group(kind: type[G], recipe: object) -> G:
    """The group `kind` filled from the recipe's fields of the same names."""
    return kind(**{f.name: getattr(recipe, f.name) for f in fields(kind)})


@dataclass(frozen=True)
class NetworkSettings:
    """The trained network (kohya's networks/lora.py and network_args; network.py builds it)."""

    network_dim: int
    network_alpha: float
    conv_dim: int | None
    conv_alpha: float | None
    use_dora: bool
    network_train_unet_only: bool
    train_blocks: str = "all"  # FLUX.1's blocks that carry the LoRA (all, double, single)
    train_t5xxl: bool = False  # FLUX.1's T5 encoder carries a LoRA too, when the text encoders train
    network_algo: NetworkAlgo = "lora"  # LyCORIS' loha / lokr instead of the LoRA (core/models/lycoris.py)
    lokr_factor: int = -1  # LoKr's Kronecker factor (LyCORIS' factor)

    @property
    def conv_alpha_value(self) -> float:
        """kohya's conv_alpha default: 1.0 when conv_dim is set without it."""
        return 1.0 if self.conv_alpha is None else self.conv_alpha


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer and its step sizes (optim.py); `text_encoder_lr` is the text encoders' group's."""

    optimizer: str
    learning_rate: float
    weight_decay: float
    adafactor_relative_step: bool
    text_encoder_lr: float | None
    optimizer_args: dict[str, OptimizerArgValue] | None = None  # kohya's --optimizer_args, given to the constructor

    @property
    def relative_step(self) -> bool:
        """Adafactor choosing its own step size, which replaces the schedule (kohya's `adafactor:<lr>`)."""
        return self.optimizer == "Adafactor" and self.adafactor_relative_step


@dataclass(frozen=True)
class ScheduleSettings:
    """The learning-rate schedule over all steps (diffusers' schedules as kohya's get_scheduler_fix calls them)."""

    lr_scheduler: str
    lr_warmup_steps: int
    lr_scheduler_num_cycles: int
    lr_scheduler_power: float


@dataclass(frozen=True)
class NoiseSettings:
    """kohya's noise options of a step and the loss weights that depend on the noise (noise.py, loop.py), the
    training noise schedule (`v_parameterization`, `zero_terminal_snr`), the drawn timesteps' bounds
    (`min_timestep`, `max_timestep`; null: 0 and the schedule's num_train_timesteps) and their density
    (`timestep_sampling`: sigma / uniform, sigmoid with `sigmoid_scale`, logit_normal with `logit_mean`,
    `logit_std`; noise.py) and the loss function
    (`loss_type`, the Huber threshold's `huber_schedule`, `huber_c`, `huber_scale`; step/loss.py). The defaults
    are all off (MSE at uniform timesteps)."""

    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    debiased_estimation_loss: bool = False
    v_parameterization: bool = False
    zero_terminal_snr: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None
    loss_type: LossType = "l2"
    huber_schedule: HuberSchedule = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    timestep_sampling: TimestepSampling = "sigma"  # the U-Nets' modes: sigma / uniform, sigmoid, logit_normal
    sigmoid_scale: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass(frozen=True)
class EmaSettings:
    """The EMA of the LoRA weights (`use_ema`; step/ema.py keeps it)."""

    use_ema: bool = False
    ema_decay: float = 0.995
    ema_update_after_step: int = 0
    ema_warmup: bool = False
    ema_power: float = 2 / 3

    def decay(self, step: int) -> float:
        """The decay of the update after optimizer step `step` (1-based), as diffusers' EMAModel.get_decay."""
        n = max(0, step - self.ema_update_after_step - 1)
        if n <= 0:
            return 0.0
        ramp = 1 - (1 + n) ** -self.ema_power if self.ema_warmup else (1 + n) / (10 + n)
        return min(ramp, self.ema_decay)

    def metadata(self) -> dict[str, str]:
        """The header keys of an EMA run (none when off: files of runs without EMA keep their bytes)."""
        if not self.use_ema:
            return {}
        return {"ss_ema": "True", "ss_ema_decay": str(self.ema_decay),
                "ss_ema_update_after_step": str(self.ema_update_after_step),
                "ss_ema_warmup": str(self.ema_warmup), "ss_ema_power": str(self.ema_power)}


@dataclass(frozen=True)
class FlowSettings:
    """kohya's flux_train_network.py options of the flow objective, with kohya's defaults; each field is the kohya
    argument of the same name (`--timestep_sampling`, `--sigmoid_scale`, `--discrete_flow_shift`,
    `--model_prediction_type`, `--weighting_scheme`, `--logit_mean`, `--logit_std`, `--mode_scale`,
    `--guidance_scale`).

    - timestep_sampling: how sigmas are drawn. "sigma": an index into the scheduler's shifted sigmas, at the
      weighting scheme's density; "uniform": U(0, 1); "sigmoid": sigmoid(sigmoid_scale * N(0, 1)); "shift": that
      sigmoid draw shifted by discrete_flow_shift; "flux_shift": shifted by the image size (FLUX.1's resolution
      dependent shift).
    - sigmoid_scale: the scale of the normal draw of "sigmoid", "shift" and "flux_shift" (larger: more uniform).
    - discrete_flow_shift: the shift of "shift" and of the scheduler's sigmas that "sigma" reads.
    - model_prediction_type: "raw" uses the output as is; "additive" adds the noisy input; "sigma_scaled" takes
      `noisy - sigma * output` and weights the loss by the weighting scheme.
    - weighting_scheme: "logit_normal" and "mode" shape the density of "sigma" sampling; "sigma_sqrt" and
      "cosmap" weight the loss of "sigma_scaled" predictions; "uniform" (kohya's default) does what "none"
      does, so kohya settings read unchanged.
    - logit_mean, logit_std: the normal of "logit_normal"; mode_scale: the scale of "mode".
    - guidance_scale: the guidance FLUX.1 dev is given as input while training (its distilled guidance embedding).
      kohya's argument defaults to 3.5, but its FLUX.1 guide (docs/flux_train_network.md) trains with 1.0, which
      turns the distilled guidance off.
    """

    timestep_sampling: TimestepSampling = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: PredictionType = "sigma_scaled"
    weighting_scheme: WeightingScheme = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        for name, choices in (("timestep_sampling", TimestepSampling), ("model_prediction_type", PredictionType),
                              ("weighting_scheme", WeightingScheme)):
            if getattr(self, name) not in get_args(choices):
                raise ValueError(f"{name} must be one of {get_args(choices)}, not {getattr(self, name)!r}")


@dataclass(frozen=True)
class CaptionDropout:
    """kohya's caption dropout settings (all off by default)."""

    rate: float = 0.0  # caption_dropout_rate
    every_n_epochs: int = 0  # caption_dropout_every_n_epochs
    tag_rate: float = 0.0  # caption_tag_dropout_rate

    @property
    def on(self) -> bool:
        return self.rate > 0 or self.every_n_epochs > 0 or self.tag_rate > 0


@dataclass(frozen=True)
class AugmentationSettings:
    """How captions and images vary from step to step (caption_shuffle.py, augment.py)."""

    shuffle_caption: bool
    keep_tokens: int
    caption_separator: str
    caption_dropout_rate: float
    caption_dropout_every_n_epochs: int
    caption_tag_dropout_rate: float
    flip_aug: bool
    random_crop: bool

    @property
    def caption_dropout(self) -> CaptionDropout:
        return CaptionDropout(self.caption_dropout_rate, self.caption_dropout_every_n_epochs,
                              self.caption_tag_dropout_rate)


@dataclass(frozen=True)
class AutomationSettings:
    """When a recipe trains by itself: `train_on` names dataset families (names or globs)."""

    train_on: tuple[str, ...]

    def trains_on(self, version: str) -> bool:
        """Whether `train_on` names the dataset version's family (by name or glob)."""
        name = family(version)
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.train_on)
