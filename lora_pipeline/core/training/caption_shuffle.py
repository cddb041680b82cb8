"""Caption tag shuffling (kohya's shuffle_caption with keep_tokens), reproducible from (seed, epoch, step)."""

from __future__ import annotations

import numpy as np

from lora_pipeline.core.datasets.tags import join_tags, split_tags
from lora_pipeline.core.training.seeds import Stream, numpy_rng


def shuffle_caption(caption: str, separator: str, keep_tokens: int, rng: np.random.Generator) -> str:
    """The caption with its first `keep_tokens` tags in place and the rest in a random order."""
    tags = split_tags(caption, separator)
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    return join_tags(head + [tail[i] for i in rng.permutation(len(tail))], separator)


def step_captions(
    captions: list[str], separator: str, keep_tokens: int, shuffle: bool, seed: int, epoch: int, step: int
) -> list[str]:
    """The captions of one batch as the text encoder sees them at this step."""
    if not shuffle:
        return list(captions)
    rng = numpy_rng(seed, Stream.CAPTIONS, epoch, step)
    return [shuffle_caption(caption, separator, keep_tokens, rng) for caption in captions]
