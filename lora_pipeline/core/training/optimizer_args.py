"""kohya's `--optimizer_args` as the recipe's `optimizer_args` mapping: which keys each optimizer takes, and how
kohya writes them into `ss_optimizer`.

The keys are those of each optimizer's constructor (lora_pipeline_tests/test_optimizer_args.py reads the
signatures back), less what the recipe or the trainer sets: `lr` (learning_rate), Adafactor's `relative_step`
(adafactor_relative_step), AdamWScheduleFree's `warmup_steps` (lr_warmup_steps), and AdamW's `fused`,
`capturable` and `foreach` (chosen by the device; the fast path needs them as they are). Reading a recipe must not
import torch, so the keys are listed here rather than read from the classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# kohya's ss_optimizer names the class as `module.Class`; DAdaptAdamW is dadaptation's DAdaptAdam with decouple=True
# (step/dadapt.py), which kohya calls DAdaptAdam
OPTIMIZER_CLASSES = {
    "AdamW": "torch.optim.adamw.AdamW", "AdamW8bit": "bitsandbytes.optim.adamw.AdamW8bit",
    "Lion": "lion_pytorch.lion_pytorch.Lion", "Adafactor": "transformers.optimization.Adafactor",
    "AdamWScheduleFree": "schedulefree.adamw_schedulefree.AdamWScheduleFree", "Prodigy": "prodigyopt.prodigy.Prodigy",
    "DAdaptAdamW": "dadaptation.dadapt_adam.DAdaptAdam",
}
MAX_GRAD_NORM = 1.0  # kohya's --max_grad_norm default: the gradient norm every step clips to (step/loop.py)

_ADAM = ("betas", "eps", "weight_decay")
OPTIMIZER_ARGS: dict[str, tuple[str, ...]] = {
    "DAdaptAdamW": (*_ADAM, "d0", "growth_rate"),
    "AdamW": (*_ADAM, "amsgrad", "maximize"),
    "AdamW8bit": (*_ADAM, "amsgrad", "optim_bits", "is_paged", "min_8bit_size"),
    "Prodigy": (*_ADAM, "beta3", "decouple", "use_bias_correction", "safeguard_warmup", "d0", "d_coef",
                "growth_rate", "slice_p"),
    "Lion": ("betas", "weight_decay", "decoupled_weight_decay"),
    "Adafactor": ("eps", "clip_threshold", "decay_rate", "beta1", "weight_decay", "scale_parameter", "warmup_init"),
    "AdamWScheduleFree": (*_ADAM, "r", "weight_lr_power"),
}
# Keys that recipe fields set: refused in optimizer_args with the field to use instead.
FIELD_KEYS = {"lr": "learning_rate", "relative_step": "adafactor_relative_step", "warmup_steps": "lr_warmup_steps"}


def optimizer_args_problem(optimizer: str, args: Mapping[str, Any] | None) -> str | None:
    """The first key of `args` that `optimizer` does not take, as one line; None: all are taken."""
    for key in args or {}:
        if key in FIELD_KEYS:
            return f"optimizer_args: {key!r} is the recipe field {FIELD_KEYS[key]}; set that instead"
        if key not in OPTIMIZER_ARGS[optimizer]:
            return (f"optimizer_args: {optimizer} takes no argument {key!r} (it takes "
                    f"{', '.join(OPTIMIZER_ARGS[optimizer])})")
    return None


def kohya_optimizer_args(args: Mapping[str, Any]) -> str:
    """kohya's `ss_optimizer` arguments: `key=value` joined by commas, each value as Python prints it (a tuple of
    betas as `(0.9, 0.99)`, flags as True / False)."""
    return ",".join(f"{key}={tuple(value) if isinstance(value, list) else value}" for key, value in args.items())
