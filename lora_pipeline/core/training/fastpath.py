"""The trainer's fast path: regional `torch.compile` of the U-Net's repeated blocks, with a persistent cache.

A LoRA step on an SD U-Net is launch-bound: about 11,000 small kernels (LoRA matmuls, autocast casts,
fp32 GroupNorm round trips) whose launch cost the host pays one by one. Compiling the repeated blocks
(every `BasicTransformerBlock` and `ResnetBlock2D`, with their LoRA layers) lets inductor fuse the
elementwise work around the matmuls, in forward and backward, into far fewer kernels. Compiling the blocks
rather than the whole U-Net compiles each distinct block shape once (one graph serves every instance of a
width) and takes a minute or two instead of many; new bucket shapes make dynamo mark the spatial sizes
dynamic after the first recompile, so a bucketed dataset does not recompile per bucket.

The compiled artifacts (inductor's FX graph and AOTAutograd caches, Triton kernels) go to
`<data root>/cache/torch_compile`, so the second run of the same model and bucket shapes loads them instead
of compiling. `module.compile()` compiles in place: parameter names, state dicts and the saved LoRA files
are exactly those of the eager model.

Status (measured on an H200, see benchmarks/RESULTS.md): the first SD 1.5 step did not finish compiling within
140 s, because dynamo builds about 31 distinct block graphs for SD 1.5 (instances of one width do not all share
a graph) and inductor compiles each for forward and backward. So the recipe option `fast_path` is off by
default: it is worth turning on for long runs, and for repeated runs of one model and bucket set (the cache).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D

COMPILED_BLOCKS = (BasicTransformerBlock, ResnetBlock2D)
# More distinct block shapes than dynamo's default of 8 recompiles per code object: SDXL has 2 transformer
# widths and ~8 resnet variants, each compiled once static and once with dynamic spatial sizes.
RECOMPILE_LIMIT = 64


def use_compile_cache(cache_dir: Path) -> Path:
    """Point inductor (and Triton) at `cache_dir` for this process; both read these variables when they compile."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir / "triton")
    return cache_dir


def compile_blocks(unet: torch.nn.Module, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile every repeated block of `unet` in place; returns how many modules were compiled."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    blocks = [module for module in unet.modules() if isinstance(module, COMPILED_BLOCKS)]
    for block in blocks:
        block.compile(backend=backend, mode=mode)
    return len(blocks)
