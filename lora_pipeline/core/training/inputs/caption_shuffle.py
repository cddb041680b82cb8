"""What the text encoder sees of a caption at one step, as kohya's `process_caption` makes it, reproducible from
(seed, epoch, step): caption dropout (`caption_dropout_rate`, `caption_dropout_every_n_epochs`: the whole caption
becomes empty), else tag shuffling (`shuffle_caption`) and tag dropout (`caption_tag_dropout_rate`) of the tags
after the first `keep_tokens`, which are never moved or dropped.

Random numbers are drawn only for options that are on, so turning an option off gives exactly the draws of a run
without it.
"""

from __future__ import annotations

import numpy as np

from lora_pipeline.core.datasets.captions.tags import join_tags, split_tags
from lora_pipeline.core.training.recipe_groups import CaptionDropout
from lora_pipeline.core.training.seeds import Stream, numpy_rng


def shuffle_caption(caption: str, separator: str, keep_tokens: int, rng: np.random.Generator,
                    shuffle: bool = True, tag_rate: float = 0.0) -> str:
    """The caption with its first `keep_tokens` tags in place and the rest shuffled (when `shuffle`), each of
    them then left out with chance `tag_rate`."""
    tags = split_tags(caption, separator)
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle:
        tail = [tail[i] for i in rng.permutation(len(tail))]
    if tag_rate > 0:
        tail = [tag for tag, draw in zip(tail, rng.random(len(tail)), strict=True) if draw >= tag_rate]
    return join_tags(head + tail, separator)


def step_captions(
    captions: list[str], separator: str, keep_tokens: int, shuffle: bool, seed: int, epoch: int, step: int,
    dropout: CaptionDropout = CaptionDropout(),
) -> list[str]:
    """The captions of one batch as the text encoder sees them at this step."""
    if not shuffle and not dropout.on:
        return list(captions)
    if dropout.every_n_epochs > 0 and epoch % dropout.every_n_epochs == 0:
        return ["" for _ in captions]
    rng = numpy_rng(seed, Stream.CAPTIONS, epoch, step)
    out = []
    for caption in captions:
        if dropout.rate > 0 and rng.random() < dropout.rate:
            out.append("")
        elif shuffle or dropout.tag_rate > 0:
            out.append(shuffle_caption(caption, separator, keep_tokens, rng, shuffle, dropout.tag_rate))
        else:
            out.append(caption)
    return out
