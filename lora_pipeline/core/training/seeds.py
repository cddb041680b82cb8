"""Every random number of a training run comes from a generator seeded by (recipe seed, stream, position).

Nothing draws from a global RNG, so a run resumed at an epoch boundary replays exactly what an uninterrupted
run would have drawn: data order per epoch from (seed, epoch), noise and timesteps per step from (seed, global
step), caption shuffles from (seed, epoch, step).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

UINT64 = (1 << 64) - 1


class Stream(IntEnum):
    """Independent random streams; the value is part of the seed, so streams never share numbers."""

    ORDER = 1  # bucket shuffles and batch order of one epoch
    NOISE = 2  # noise, noise offset and timesteps of one step
    CAPTIONS = 3  # caption tag shuffles of one step
    LATENTS = 4  # VAE posterior samples
    INIT = 5  # LoRA down-projection initialisation
    AUGMENT = 6  # flips and random crops of one step
    DROPOUT = 7  # the LoRA's network, rank and module dropout masks of one step (kohya/dropout.py)


def derive_seed(seed: int, stream: Stream, *parts: int) -> int:
    """A 63-bit seed mixed from the recipe seed, the stream and the position (NumPy's SeedSequence hashing)."""
    entropy = [seed & UINT64, int(stream), *(p & UINT64 for p in parts)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def numpy_rng(seed: int, stream: Stream, *parts: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, stream, *parts))


def torch_generator(seed: int, stream: Stream, *parts: int) -> torch.Generator:
    """A CPU generator: draws are identical whatever device the tensors then move to."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, stream, *parts))
