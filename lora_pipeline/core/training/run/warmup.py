"""Every batch shape of a run warmed up before its first epoch, so no epoch stops at a bucket's first step.

With the fast path each input shape costs the capture of its CUDA graph (step/fastpath.py), and the run's first
one an eager step before it (it lets cuBLAS, the autograd engine and the optimizer's state settle). Measured with
gpu_e2e.py on an H100 (issue 22) these first steps were 10.6 s of an SD1.5 run and 31.0 s of an SDXL one, spread
over the epochs; taken ahead, with an eager step for every shape, 8.2 s and 21.4 s; with one eager step per run,
5.1 s and 8.4 s. `warm_up_shapes` takes them all up front, from the run's batch plan: the first batch of each
distinct shape (its size and bucket) of the epochs still to train (`TrainingRun.planned_shapes`), built as
training builds it (`loop.step_inputs`), so its inputs have exactly the layout the step will replay. On a GPU
the latent cache is filled meanwhile, these batches' images first (encode.LatentSource), and the captures let
that thread work (`capture_error_mode="thread_local"`: step/fastpath.py). Both the eager step and (on a
CPU, where there is no graph) the recording change the LoRA and the optimizer state, so they are put back
afterwards, in place (a graph reads its tensors by address):

- the LoRA weights, the optimizer's per-parameter state that existed before, and every tensor of its parameter
  groups (DAdaptAdamW's d, numerator and step count) get their values back;
- per-parameter state that the warm-up created is zeroed: zeros is the fresh state of the optimizers this is
  done for (`RESTORABLE`: DAdaptAdamW and torch's AdamW, whose step count starts at 0); a run with another
  optimizer, or with fp16's gradient scaler, keeps warming each shape at its first steps;
- the host RNG state is put back.

So the steps that follow are those of a run without the warm-up: on a CPU the files are byte-identical
(test_fastpath.py). The time goes to the run's `warmup_ahead` timing and into one log line; the shapes it
warmed take no warm-up steps in the epochs (`shape_warmup` stays 0 for them).
"""

from __future__ import annotations

import time

import torch

from lora_pipeline.core.training.kohya.network import trainable
from lora_pipeline.core.training.run.setup import TrainingRun
from lora_pipeline.core.training.step.dadapt import DAdaptAdamW
from lora_pipeline.core.training.step.fastpath import GraphedSteps
from lora_pipeline.core.training.step.loop import StepContext, step_inputs

RESTORABLE = (DAdaptAdamW, torch.optim.AdamW)  # optimizers whose fresh per-parameter state is all zeros


class _TrainingState:
    """The values the warm-up changes, taken before it and put back in place after it (module docstring)."""

    def __init__(self, run: TrainingRun, ctx: StepContext):
        self.optimizer = getattr(ctx.parts.optimizer, "optimizer", ctx.parts.optimizer)  # accelerate's wrapper
        self.params = [(p, p.detach().clone()) for p in trainable(run.base).values()]
        self.state = {p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                      for p, s in self.optimizer.state.items()}
        self.groups = [(v, v.clone()) for group in self.optimizer.param_groups for v in group.values()
                       if isinstance(v, torch.Tensor)]
        self.plain = [(group, {k: v for k, v in group.items() if not isinstance(v, torch.Tensor)})
                      for group in self.optimizer.param_groups]  # e.g. a step count an older resume state kept
        self.rng = torch.get_rng_state()

    @torch.no_grad()
    def restore(self) -> None:
        for param, value in self.params:
            param.copy_(value)
            param.grad = None
        for param, state in self.optimizer.state.items():
            before = self.state.get(param)
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    raise RuntimeError(f"warm-up: optimizer state {key!r} is not a tensor; it cannot be put back")
                if before is None:
                    value.zero_()
                else:
                    value.copy_(before[key])
        for tensor, value in self.groups:
            tensor.copy_(value)
        for group, values in self.plain:
            group.update(values)
        torch.set_rng_state(self.rng)


def warm_up_shapes(run: TrainingRun, ctx: StepContext) -> float:
    """Warm up and capture every batch shape of the epochs this call trains (module docstring); the seconds it
    took (0.0 where the run warms each shape at its first steps instead, or has none left)."""
    update, optimizer = ctx.update, getattr(ctx.parts.optimizer, "optimizer", ctx.parts.optimizer)
    plan = run.planned_shapes
    if not isinstance(update, GraphedSteps) or not plan:
        return 0.0
    if not isinstance(optimizer, RESTORABLE) or ctx.parts.accelerator.scaler is not None:
        run.log(f"warm-up at each batch shape's first steps ({type(optimizer).__name__}"
                f"{' with a gradient scaler' if ctx.parts.accelerator.scaler is not None else ''}: its state is not "
                "put back after a warm-up ahead)")
        return 0.0
    _sync(run.device)
    started = time.perf_counter()
    saved = _TrainingState(run, ctx)
    try:
        for epoch, step, indices in plan:
            batch, drawn = step_inputs(ctx, epoch, step, indices)
            update.warm_up(batch, drawn)
            shape = tuple((batch[0] if isinstance(batch, list) else batch).latents.shape)
            ctx.shapes_seen[shape] = max(ctx.shapes_seen.get(shape, 0), ctx.warmup_steps_per_shape)
    finally:
        saved.restore()
    _sync(run.device)
    seconds = time.perf_counter() - started
    run.log(f"warm-up of {len(plan)} batch shape(s) took {seconds:.1f} s (captures, after one eager step, "
            "before the first epoch)")
    return seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
