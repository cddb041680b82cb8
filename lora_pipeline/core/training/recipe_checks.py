"""Which combinations of recipe fields a recipe refuses, and why a run's steps cannot be captured as CUDA graphs.

`recipe_problems` is what `Recipe` validates after its fields (the first problem is the one-line error);
`fast_path_blockers` is the one answer to whether a run's steps can be captured (step/fastpath.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_pipeline.core.models.families import model_family
from lora_pipeline.core.models.families.base import DDPM, RECTIFIED_FLOW
from lora_pipeline.core.training.blocks import BLOCK_FIELDS, block_problems
from lora_pipeline.core.training.optimizer_args import optimizer_args_problem
from lora_pipeline.core.training.recipe_fields import RecipeFields
from lora_pipeline.core.training.recipe_groups import NetworkSettings, OptimizerSettings, read_group

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
# LoHa / LoKr are not written in FLUX.1's fused layout (a fused q/k/v is no LoHa of its parts). timestep_sampling,
# sigmoid_scale, logit_mean and logit_std are both objectives' (their modes per family: `timestep_problems`).
OBJECTIVE_ONLY = {
    DDPM: ("v_parameterization", "zero_terminal_snr", "min_snr_gamma", "debiased_estimation_loss", "conv_dim",
           "noise_offset", "multires_noise_iterations", "ip_noise_gamma", "use_dora", "min_timestep", "max_timestep",
           "network_algo", "lokr_factor"),
    RECTIFIED_FLOW: ("discrete_flow_shift", "model_prediction_type", "weighting_scheme", "mode_scale",
                     "train_blocks", "t5xxl_max_token_length", "flux_guidance_scale"),
}
# the fields each U-Net timestep_sampling mode reads (FLUX.1's read them as kohya's flux_train_network does)
DDPM_SAMPLING_FIELDS = {"sigmoid_scale": ("sigmoid",), "logit_mean": ("logit_normal",),
                        "logit_std": ("logit_normal",)}


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
                                     _timestep_problem(recipe), _algo_problem(recipe)) if problem]
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
    found += _t5_conflicts(recipe) + _ema_conflicts(recipe) + _network_args_conflicts(recipe)
    if recipe.cache_text_encoder_outputs_to_disk and (changing := _changing_captions(recipe)):
        found.append(f"cache_text_encoder_outputs_to_disk needs captions that never change and frozen text "
                     f"encoders (as kohya's): not {', '.join(changing)}")
    if recipe.sample_every_n_epochs is not None and not recipe.sample_prompts:
        found.append("sample_every_n_epochs needs sample_prompts")
    return found + _family_conflicts(recipe)


def _network_args_conflicts(recipe: RecipeFields) -> list[str]:
    """kohya's block-wise lists of the family's length; lr weights with an optimizer of one step size; dropouts
    without gradient checkpointing (its recomputed forward would draw other masks); resolutions of the family."""
    network, family = read_group(NetworkSettings, recipe), model_family(recipe.model_family)
    infos = type(recipe).__pydantic_fields__
    found = []
    if family.kohya_blocks is not None:
        found += block_problems(family.kohya_blocks, dict(network.block_lists), network.lr_weights)
    else:
        found += [f"{name} is not an option of {family.label} model (model_family: {recipe.model_family}): it has "
                  "no kohya U-Net blocks; leave it unset"
                  for name in BLOCK_FIELDS if getattr(recipe, name) != infos[name].default][:1]
    lr_weights = [name for name, value in network.lr_weights.items() if value is not None]
    if lr_weights and recipe.optimizer in ADAPTIVE:
        found.append(f"{recipe.optimizer} adapts one step size for every LoRA weight; leave {lr_weights[0]} unset "
                     "or use AdamW")
    dropouts = [name for name in ("network_dropout", "rank_dropout", "module_dropout") if getattr(recipe, name)]
    if dropouts and recipe.gradient_checkpointing:
        found.append(f"{dropouts[0]} cannot be used with gradient_checkpointing yet (the recomputed forward would "
                     "draw other dropout masks)")
    if len(set(recipe.resolutions)) != len(recipe.resolutions):
        found.append("resolutions must not repeat a side")
    return found


def _timestep_problem(recipe: RecipeFields) -> str | None:
    low, high = recipe.min_timestep, recipe.max_timestep
    if low is not None and high is not None and low > high:
        return "min_timestep must not be larger than max_timestep"
    return None


def _algo_problem(recipe: RecipeFields) -> str | None:
    if recipe.network_algo != "lora" and recipe.use_dora:
        return f"use_dora is a LoRA option; this trainer has no DoRA form of network_algo: {recipe.network_algo}"
    if recipe.network_algo != "lokr" and recipe.lokr_factor != -1:
        return "lokr_factor needs network_algo: lokr"
    if recipe.lokr_factor == 0:
        return "lokr_factor must be -1 (the most square split) or a side of at least 1"
    if recipe.network_algo != "lora" and recipe.from_lora is not None:
        return f"from_lora starts from a LoRA's weights; it has no form for network_algo: {recipe.network_algo}"
    return None


def timestep_problems(recipe: RecipeFields) -> list[str]:
    """The timestep_sampling mode the family takes, and (on a U-Net) no field of another mode set."""
    family = model_family(recipe.model_family)
    if recipe.timestep_sampling not in family.timestep_samplings:
        hint = " (FLUX.1's logit-normal density is weighting_scheme: logit_normal)" \
            if recipe.timestep_sampling == "logit_normal" else ""
        return [f"timestep_sampling: {recipe.timestep_sampling} is not a mode of {family.label} model (one of "
                f"{', '.join(family.timestep_samplings)}){hint}"]
    if family.objective != DDPM:
        return []
    infos = type(recipe).__pydantic_fields__
    return [f"{name} is read only by timestep_sampling: {' or '.join(modes)}; leave it unset"
            for name, modes in DDPM_SAMPLING_FIELDS.items()
            if getattr(recipe, name) != infos[name].default and recipe.timestep_sampling not in modes]
def _ema_conflicts(recipe: RecipeFields) -> list[str]:
    """The EMA's settings need `use_ema`; a schedule-free optimizer already saves averaged weights."""
    infos = type(recipe).__pydantic_fields__
    settings = ("ema_decay", "ema_update_after_step", "ema_warmup", "ema_power")
    if not recipe.use_ema:
        return [f"{name} needs use_ema: true" for name in settings if getattr(recipe, name) != infos[name].default]
    if recipe.optimizer == "AdamWScheduleFree":
        return ["use_ema cannot be used with AdamWScheduleFree (its files already hold its averaged weights)"]
    return []


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
    found += timestep_problems(recipe)
    if family.objective != DDPM and recipe.loss_type in ("huber", "smooth_l1") and recipe.huber_schedule == "snr":
        found.append(f"huber_schedule: snr needs a DDPM noise schedule, which {family.label} model does not train on "
                     "(kohya's FLUX.1 trainer fails on it too); use huber_schedule: exponential or constant")
    if recipe.blocks_to_swap > family.max_blocks_to_swap:
        found.append(f"blocks_to_swap must be at most {family.max_blocks_to_swap} for {family.label} model")
    steps = {"resolution": recipe.resolution, "bucket_reso_steps": recipe.bucket_reso_steps,
             **{f"resolutions[{i}]": side for i, side in enumerate(recipe.resolutions)}}
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
    if recipe.network_algo != "lora":
        found.append(f"network_algo: {recipe.network_algo} has not been run under the captured step (no CUDA test of "
                     "LoHa/LoKr yet)")
    if any(value is not None for value in read_group(NetworkSettings, recipe).lr_weights.values()):
        found.append("down/mid/up_lr_weight give the U-Net's blocks their own learning rates (the captured step "
                     "fills one)")
    if recipe.network_dropout or recipe.rank_dropout or recipe.module_dropout:
        found.append("the LoRA dropouts draw their masks inside the step from a generator reseeded on the host each "
                     "step, which a captured graph would replay unchanged")
    if processes > 1:
        found.append(f"{processes} processes train together (DDP: a captured CUDA graph holds one process's step, "
                     "not the gradient all-reduce)")
    return found
