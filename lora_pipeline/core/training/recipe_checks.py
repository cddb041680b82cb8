"""Which combinations of recipe fields a recipe refuses, and why a run's steps cannot be captured as CUDA graphs.

`recipe_problems` is what `Recipe` validates after its fields (the first problem is the one-line error);
`fast_path_blockers` is the one answer to whether a run's steps can be captured (step/fastpath.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_pipeline.core.models.families import model_family
from lora_pipeline.core.models.families.base import DDPM, RECTIFIED_FLOW
from lora_pipeline.core.training.optimizer_args import optimizer_args_problem
from lora_pipeline.core.training.recipe_fields import RecipeFields
from lora_pipeline.core.training.recipe_groups import OptimizerSettings, read_group

if TYPE_CHECKING:  # reading a recipe must not import torch
    import torch

# Keep their state on the device and update it in place: captured with the step (Prodigy: step/prodigy.py).
GRAPH_SAFE_OPTIMIZERS = ("DAdaptAdamW", "AdamW", "Prodigy")
# Cannot be captured (step count and lr passed to its kernel by value, step/adamw8bit.py) but reads nothing back:
# the fast path captures forward, backward and clipping and runs this optimizer's step after each replay.
OUTSIDE_GRAPH_OPTIMIZERS = ("AdamW8bit",)
ADAPTIVE = ("DAdaptAdamW", "Prodigy")  # adapt one step size for all LoRA weights
# The fields only one training objective reads (the family's `objective`): set away from their defaults on a model
# of the other objective they are refused. DoRA and ip_noise_gamma are not implemented for the flow step yet.
OBJECTIVE_ONLY = {
    DDPM: ("v_parameterization", "zero_terminal_snr", "min_snr_gamma", "debiased_estimation_loss", "conv_dim",
           "noise_offset", "multires_noise_iterations", "ip_noise_gamma", "use_dora", "min_timestep", "max_timestep"),
    RECTIFIED_FLOW: ("timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "model_prediction_type",
                     "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "train_blocks",
                     "t5xxl_max_token_length", "flux_guidance_scale"),
}


def recipe_problems(recipe: RecipeFields) -> list[str]:
    """What is wrong with the recipe's combination of fields, most basic first; empty: nothing."""
    found = []
    if recipe.min_bucket_reso > recipe.max_bucket_reso:
        found.append("min_bucket_reso must not be larger than max_bucket_reso")
    if recipe.random_crop and recipe.cache_latents:
        found.append("random_crop needs cache_latents: false (a crop that changes at every step cannot be cached; "
                     "kohya refuses it too)")
    if recipe.cache_latents_to_disk and not recipe.cache_latents:
        found.append("cache_latents_to_disk needs cache_latents: true")
    found += _conflicts(recipe)
    if recipe.fast_path and (blockers := fast_path_blockers(recipe)):
        found.append(f"fast_path: true is impossible here: {blockers[0]}")
    return found


def _conflicts(recipe: RecipeFields) -> list[str]:
    found = [problem for problem in (optimizer_args_problem(recipe.optimizer, recipe.optimizer_args),
                                     _timestep_problem(recipe)) if problem]
    if recipe.conv_alpha is not None and recipe.conv_dim is None:
        found.append("conv_alpha needs conv_dim")
    if recipe.text_encoder_lr is not None and recipe.network_train_unet_only:
        found.append("text_encoder_lr needs network_train_unet_only: false")
    if recipe.text_encoder_lr is not None and recipe.optimizer in ADAPTIVE:
        found.append(f"{recipe.optimizer} adapts one step size for every LoRA weight; leave text_encoder_lr unset")
    relative_step = read_group(OptimizerSettings, recipe).relative_step
    needs_constant = recipe.optimizer == "AdamWScheduleFree" or relative_step
    if needs_constant and recipe.lr_scheduler != "constant":
        found.append(f"{recipe.optimizer} sets its own schedule (kohya's "
                     f"{'adafactor' if recipe.optimizer == 'Adafactor' else 'schedule-free'} mode); "
                     "use lr_scheduler: constant")
    if relative_step and recipe.lr_warmup_steps:
        found.append("relative-step Adafactor has no warm-up (kohya refuses it too); set lr_warmup_steps: 0")
    if recipe.zero_terminal_snr and not recipe.v_parameterization:
        found.append("zero_terminal_snr needs v_parameterization: true (epsilon cannot be predicted at zero SNR)")
    found += _t5_conflicts(recipe)
    if recipe.cache_text_encoder_outputs_to_disk and (changing := _changing_captions(recipe)):
        found.append(f"cache_text_encoder_outputs_to_disk needs captions that never change and frozen text "
                     f"encoders (as kohya's): not {', '.join(changing)}")
    if recipe.sample_every_n_epochs is not None and not recipe.sample_prompts:
        found.append("sample_every_n_epochs needs sample_prompts")
    return found + _family_conflicts(recipe)


def _timestep_problem(recipe: RecipeFields) -> str | None:
    low, high = recipe.min_timestep, recipe.max_timestep
    if low is not None and high is not None and low > high:
        return "min_timestep must not be larger than max_timestep"
    return None


def _t5_conflicts(recipe: RecipeFields) -> list[str]:
    """train_t5xxl: a family with a T5 encoder, the text encoders training, and T5's outputs never cached (kohya's
    flux_train_network.py refuses cache_text_encoder_outputs with train_t5xxl too)."""
    if not recipe.train_t5xxl:
        return []
    family = model_family(recipe.model_family)
    if not family.t5_prefix:
        return [f"train_t5xxl is not an option of {family.label} model (model_family: {recipe.model_family}): it "
                "has no T5 text encoder; leave it unset"]
    if recipe.cache_text_encoder_outputs_to_disk:
        return ["cache_text_encoder_outputs_to_disk cannot be used with train_t5xxl: true (T5's outputs change as "
                "its LoRA trains; kohya refuses it too)"]
    if recipe.network_train_unet_only:
        return ["train_t5xxl needs network_train_unet_only: false (the T5 LoRA trains beside CLIP-L's, as kohya's)"]
    return []


def _changing_captions(recipe: RecipeFields) -> list[str]:
    """The fields that make a caption's text-encoder outputs change from step to step."""
    changing = {"shuffle_caption": recipe.shuffle_caption, "caption_dropout_rate": recipe.caption_dropout_rate,
                "caption_dropout_every_n_epochs": recipe.caption_dropout_every_n_epochs,
                "caption_tag_dropout_rate": recipe.caption_tag_dropout_rate,
                "network_train_unet_only": not recipe.network_train_unet_only}
    return [f"{name}: {str(getattr(recipe, name)).lower()}" for name, value in changing.items() if value]


def _family_conflicts(recipe: RecipeFields) -> list[str]:
    """The options of another objective than the family's, set away from their defaults; image sides the
    family's latents cannot take."""
    family = model_family(recipe.model_family)
    infos = type(recipe).__pydantic_fields__
    found = [f"{name} is not an option of {family.label} model (model_family: {recipe.model_family}); leave it "
             "unset" for objective, names in OBJECTIVE_ONLY.items() if objective != family.objective
             for name in names if getattr(recipe, name) != infos[name].default]
    if family.objective != DDPM and recipe.loss_type in ("huber", "smooth_l1") and recipe.huber_schedule == "snr":
        found.append(f"huber_schedule: snr needs a DDPM noise schedule, which {family.label} model does not train on "
                     "(kohya's FLUX.1 trainer fails on it too); use huber_schedule: exponential or constant")
    if recipe.blocks_to_swap > family.max_blocks_to_swap:
        found.append(f"blocks_to_swap must be at most {family.max_blocks_to_swap} for {family.label} model")
    steps = {"resolution": recipe.resolution, "bucket_reso_steps": recipe.bucket_reso_steps}
    found += [f"{name} must be a multiple of {family.pixel_multiple} for {family.label} model"
              for name, value in steps.items() if value % family.pixel_multiple]
    return found


def fast_path_blockers(recipe: RecipeFields, device: torch.device | None = None, processes: int = 1) -> list[str]:
    """Why a run of `recipe` cannot replay its steps as captured CUDA graphs (step/fastpath.py); empty: it can.

    The one answer for every caller: the recipe's validation of `fast_path: true` (no device yet) and the DDP
    launcher (with its process count) refuse a required fast path that has a blocker, and
    `fastpath.fast_path_choice` turns an unset one on where there is none. `device`: where an unset fast path
    would run; a required one runs on a CPU too (the recorded step is called again, as the CPU tests do), so the
    refusals leave it out. Masks, class images (per-image loss weights), ip_noise_gamma and gradient accumulation
    (several micro-batches, one graph) are inputs of the captured step like any other; gradient checkpointing
    recomputes without reading the RNG state (run/memory.py's `checkpoint`), so it is captured too; training text
    encoders are captured with the denoiser (their token ids are the step's input); Prodigy keeps its state on the
    device, and AdamW8bit's step runs after each replay (OUTSIDE_GRAPH_OPTIMIZERS).
    """
    found = []
    if device is not None and device.type != "cuda":
        found.append("the device is not a CUDA GPU")
    if recipe.blocks_to_swap:
        found.append("blocks_to_swap copies block weights between the CPU and the GPU inside the step (host work "
                     "a CUDA graph cannot hold)")
    if recipe.optimizer not in (*GRAPH_SAFE_OPTIMIZERS, *OUTSIDE_GRAPH_OPTIMIZERS):
        found.append(f"{recipe.optimizer} reads values back to the host or keeps host state inside its step (the "
                     f"captured step needs {', '.join((*GRAPH_SAFE_OPTIMIZERS, *OUTSIDE_GRAPH_OPTIMIZERS))})")
    if processes > 1:
        found.append(f"{processes} processes train together (DDP: a captured CUDA graph holds one process's step, "
                     "not the gradient all-reduce)")
    return found
