"""The trainer's fast path: the whole step (forward, backward, clip, optimizer) replayed as one CUDA graph per
batch shape.

A LoRA step on an SD U-Net is launch-bound: about 11,000 small kernels (LoRA matmuls, autocast casts, fp32
GroupNorm round trips), each launched by the host one by one, so at batch 8 the GPU waits on Python (measured
on an H200: 8.8% MFU). A CUDA graph records the step's kernels once and replays them with one launch, which
takes the host out of the step. This is PyTorch's "whole-network capture"
(https://pytorch.org/docs/stable/notes/cuda.html#whole-network-capture), applied per batch shape because a
graph replays fixed shapes and a bucketed dataset has a few:

- the first step at a new shape runs eagerly on a side stream (it is a real training step; it also lets
  cuBLAS, cuDNN and the allocator settle, which a capture requires); the next step of that shape is captured
  and every later one replays, after its inputs are copied into the graph's static buffers (the trainer takes
  the eager step and the capture of every shape of its batch plan before the first epoch, `warm_up`, and puts
  the LoRA and the optimizer state back: run/warmup.py);
- every input of the step is a static buffer: the batch (or the micro-batches of an accumulated step, one graph
  for all of them), its optional inputs (loss masks, the per-image loss weights of class images, ip_noise_gamma's
  perturbation, SDXL's conditioning), the noise;
- the random inputs (noise, timesteps) are still drawn on the host from the step's own generator and copied in,
  and the learning rate is a device tensor filled before each replay: a replayed step runs the eager step's
  kernels on the same values;
- all graphs share one memory pool (they never run at once, and each step's loss is copied out right after
  its replay), so several bucket shapes cost the activation memory of the largest, not their sum;
- the step is the model family's (`StepParts.loss`): DDPM for the U-Nets, the rectified flow for FLUX.1 (its
  token ids made on the device, its sigmas drawn on the host like the timesteps); FLUX.1's block swap copies
  weights between host and device inside the step, so it takes the eager step;
- gradient checkpointing is captured too: its recomputation saves no RNG state (run/memory.py's `checkpoint`: the
  denoisers have no random op in their forward), so the checkpointed step reads nothing on the host;
- the EMA of the LoRA weights (`use_ema`, ema.py) is updated after each replay, outside the graph, from the
  weights the graph updated in place: the fast path takes it as it is;
- text encoders that carry a training LoRA are part of the step: its input is the captions' token ids
  (`StepBatch.input_ids`), the encoders' forward and backward are captured with the denoiser's;
- the optimizer keeps its state in place on the device (DAdaptAdamW and Prodigy here, torch's fused AdamW), and
  every parameter group reads its learning rate from a device tensor; AdamW8bit cannot be captured (its kernels
  take the step count and learning rate by value, on the legacy stream: adamw8bit.py), so for it the graph holds
  forward, backward and clipping, and its step runs after each replay on the gradients the graph wrote
  (`StepParts.optimizer_in_graph`); Lion, Adafactor and AdamWScheduleFree keep host state, so those runs take the
  eager step (`recipe_checks.fast_path_blockers` says why).
- kohya's block lr weights (one optimizer group per U-Net block; not yet run captured) and the LoRA dropouts
  (masks drawn inside the forward from a generator reseeded on the host each step) take the eager step; block-wise
  ranks and multi-resolution training (more batch shapes, one graph each) are captured.

Nothing is compiled, so there is no warm-up to cache across runs: the first step at each shape costs two
eager steps' time (the eager one and the capture).

Status (H200, benchmarks/RESULTS.md, 2026-12-03): 2.46x the diffusers-example-style reference step at SD 1.5
batch 8 and 3.16x at SDXL batch 4. With deterministic kernels the captured step's losses equal the eager step's
bit for bit over 40 steps, so the capture computes exactly the eager step; with the default (non-deterministic
flash-attention backward) two eager runs drift apart as much as eager and fast do, and over 200 steps at
DAdaptAdamW lr 1.0 on one fixed batch an eager run went non-finite too. So the fast path is on by default where
it can be (`fast_path_choice`): unset in a recipe, a run on one CUDA GPU takes it unless the recipe needs the
eager step.

On a CPU the same code runs with the graph replaced by calling the recorded step again (`CapturedStep`), so the
static buffers, the copies and the per-shape bookkeeping are exercised by the CPU tests, and the result is
byte-identical to the eager step there. (The learning rate stays a float on a CPU: torch's CPU AdamW takes a
different, per-tensor code path for a tensor learning rate.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline.core.training.recipe_checks import fast_path_blockers
from lora_pipeline.core.training.step.loop import StepBatch, StepNoise, StepParts, gradients, optimizer_step, update


def fast_path_choice(recipe: Recipe, device: torch.device, processes: int) -> tuple[bool, str]:
    """Whether a run replays its steps as CUDA graphs, and a log line saying why.

    `fast_path: true` and `false` are the recipe's word (where true cannot work, the recipe parser and the DDP
    launcher refuse it before this, from the same `fast_path_blockers`). Unset, it is on wherever nothing blocks
    it: one CUDA device and a recipe that allows it.
    """
    if recipe.fast_path is not None:
        return recipe.fast_path, f"fast_path: {str(recipe.fast_path).lower()} (the recipe)"
    blockers = fast_path_blockers(recipe, device, processes)
    if blockers:
        return False, f"fast_path unset: the eager step, since {blockers[0]}"
    return True, "fast_path unset: on (each step replayed as a CUDA graph)"


def _batch_tensors(batch: StepBatch) -> list[torch.Tensor | None]:
    return [getattr(batch, f.name) for f in fields(StepBatch)]


def _noise_tensors(drawn: StepNoise) -> list[torch.Tensor | None]:
    return [getattr(drawn, f.name) for f in fields(StepNoise)]


@dataclass
class _Inputs:
    """A step's tensors: its batch (or the micro-batches of an accumulated step, `micro`) and its drawn noise, with
    every optional input (SDXL's conditioning, loss masks, per-image loss weights of regularisation images, the
    input perturbation of ip_noise_gamma) that the step has. The static buffers of a graph have the same layout."""

    batches: list[StepBatch]
    drawn: StepNoise
    micro: bool

    @classmethod
    def of(cls, batch: StepBatch | Sequence[StepBatch], drawn: StepNoise) -> _Inputs:
        micro = not isinstance(batch, StepBatch)
        return cls(list(batch) if micro else [batch], drawn, micro)

    def tensors(self) -> list[torch.Tensor | None]:
        return [t for b in self.batches for t in _batch_tensors(b)] + _noise_tensors(self.drawn)

    def key(self) -> tuple:
        return (self.micro, *(None if t is None else (tuple(t.shape), t.dtype) for t in self.tensors()))

    def copy_from(self, other: _Inputs) -> None:
        for mine, theirs in zip(self.tensors(), other.tensors(), strict=True):
            if mine is not None:
                mine.copy_(theirs, non_blocking=True)

    def clone(self) -> _Inputs:
        def copied(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.clone()

        batches = [StepBatch(*map(copied, _batch_tensors(b))) for b in self.batches]
        return _Inputs(batches, StepNoise(*map(copied, _noise_tensors(self.drawn))), self.micro)

    def args(self) -> tuple[StepBatch | list[StepBatch], StepNoise]:
        return (self.batches if self.micro else self.batches[0]), self.drawn


Recorded = tuple[torch.Tensor, list[torch.Tensor | None]]  # a step's loss and the gradients it leaves (if kept)


@functools.cache
def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream captures are recorded on (one per device, as torch.cuda.graph's default capture stream)."""
    return torch.cuda.Stream(device)


class CapturedStep:
    """One recorded step: on CUDA a graph replayed with one launch, on a CPU the recorded call made again. The
    step returns its loss and, where the optimizer runs after the graph, the gradients it wrote (on CUDA the
    graph's own tensors, which every replay overwrites)."""

    def __init__(self, run: Callable[[], Recorded], device: torch.device, pool: object | None):
        self._run = run
        self.graph: torch.cuda.CUDAGraph | None = None
        if device.type == "cuda":
            # torch.cuda.graph's steps without its device-wide synchronize and empty_cache (GraphedSteps._capture
            # frees memory where an eager step left some): the latent cache's thread encodes meanwhile
            # (run/warmup.py), and may allocate and copy during the capture (thread_local)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(_capture_stream(device)):
                self.graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    self.out = run()
                finally:
                    self.graph.capture_end()
        else:
            self.out = run()  # executes the step: the call that recording stands for on a GPU
            self._ran = True

    def forget_recording(self) -> None:
        """The recording's step was undone (a warm-up ahead of training, run/warmup.py): on a CPU, where recording
        ran the step, the next replay runs it again."""
        self._ran = False

    def replay(self) -> Recorded:
        if self.graph is not None:
            self.graph.replay()
        elif self._ran:
            self._ran = False  # the recording call already took this step
        else:
            self.out = self._run()
        loss, grads = self.out
        return loss.clone(), grads


class GraphedSteps:
    """`update` for every step of a run, replayed from one captured graph per input shape (module docstring)."""

    def __init__(self, parts: StepParts, device: torch.device):
        self.parts, self.device = parts, device
        self.eager_done: set[tuple] = set()
        self.captured: dict[tuple, tuple[_Inputs, CapturedStep]] = {}
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self._eager_since_capture = False  # an eager step's activations are in the allocator's cache
        # one learning rate per parameter group (the text encoders' text_encoder_lr is a group of its own)
        self.lrs = [torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
                    for group in parts.optimizer.param_groups]

    def __call__(self, batch: StepBatch | Sequence[StepBatch], drawn: StepNoise) -> torch.Tensor:
        inputs = _Inputs.of(batch, drawn)
        key = inputs.key()
        if key in self.captured:
            static, step = self.captured[key]
            static.copy_from(inputs)
            self._fill_lrs()
            return self._replay(step)
        if key not in self.eager_done:
            self.eager_done.add(key)
            return self._eager(batch, drawn)
        static = inputs.clone()
        step = self._capture(static)
        self.captured[key] = (static, step)
        return self._replay(step)

    def _fill_lrs(self) -> None:
        for lr, group in zip(self.lrs, self.parts.optimizer.param_groups, strict=True):
            lr.fill_(float(group["lr"]))

    def _replay(self, step: CapturedStep) -> torch.Tensor:
        """A replay, then, for an optimizer outside the graph, its step on the gradients the graph wrote."""
        loss, grads = step.replay()
        if not self.parts.optimizer_in_graph:
            for param, grad in zip(self.parts.params, grads, strict=True):
                param.grad = grad
            optimizer_step(self.parts)  # queued behind the replay: no sync
        return loss

    def warm_up(self, batch: StepBatch | Sequence[StepBatch], drawn: StepNoise) -> bool:
        """Capture this input shape now, ahead of training (False: done already), after an eager step for the
        run's first shape only: what an eager step settles (cuBLAS, the autograd engine, the optimizer's state) is
        per run, not per shape. Both change the LoRA and the optimizer state: the caller puts them back
        (run/warmup.py)."""
        inputs = _Inputs.of(batch, drawn)
        key = inputs.key()
        if key in self.captured:
            return False
        if not self.eager_done:  # once per run (see the docstring)
            self.eager_done.add(key)
            self._eager(batch, drawn)
        static = inputs.clone()
        step = self._capture(static)
        step.forget_recording()
        self.captured[key] = (static, step)
        return True

    def _eager(self, batch: StepBatch | Sequence[StepBatch], drawn: StepNoise) -> torch.Tensor:
        run = update if self.parts.optimizer_in_graph else gradients
        if self.device.type != "cuda":
            loss = run(self.parts, batch, drawn)
        else:
            side = torch.cuda.Stream(self.device)  # warm-up on a side stream, as PyTorch's capture recipe does
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                loss = run(self.parts, batch, drawn)
            torch.cuda.current_stream(self.device).wait_stream(side)
        if not self.parts.optimizer_in_graph:
            optimizer_step(self.parts)  # on the current stream, as after a replay
        self._eager_since_capture = True
        return loss

    def _capture(self, static: _Inputs) -> CapturedStep:
        """Record `update` (or, for an optimizer outside the graph, `gradients`) on the static buffers; in a CUDA
        graph the optimizer reads each group's learning rate from `self.lrs`, filled before each replay (a float
        would be frozen into the graph)."""
        groups = self.parts.optimizer.param_groups
        in_graph = self.parts.optimizer_in_graph

        def step() -> Recorded:
            if not in_graph:
                loss = gradients(self.parts, *static.args())
                return loss, [p.grad for p in self.parts.params]
            if self.device.type != "cuda":  # no graph: the float the schedule wrote is read at every call
                return update(self.parts, *static.args()), []
            host_lrs = [group["lr"] for group in groups]
            for group, lr in zip(groups, self.lrs, strict=True):
                group["lr"] = lr
            try:
                return update(self.parts, *static.args()), []
            finally:
                for group, lr in zip(groups, host_lrs, strict=True):
                    group["lr"] = lr

        self._fill_lrs()
        if self.device.type == "cuda" and self._eager_since_capture:
            # the eager steps' freed activations go back to the driver: the graph's private pool allocates its own,
            # and at FLUX.1's size (about 34 GiB of activations) the two would not fit side by side
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self._eager_since_capture = False
        return CapturedStep(step, self.device, self.pool)
