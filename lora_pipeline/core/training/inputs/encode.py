"""The frozen parts of the model: VAE latents and text conditioning, cached where the recipe allows.

Latents are cached once per image when `cache_latents` is on (kohya's default for LoRA), twice (as it is and
mirrored) with `flip_aug`, and kept on disk across runs with `cache_latents_to_disk` (latent_cache.py); text embeddings
are cached per caption only when captions are not shuffled, since a shuffled caption is new at every step
and is encoded then, without gradients; `cache_text_encoder_outputs_to_disk` keeps them on disk across runs
(text_cache.py). When the text encoders carry a LoRA being trained nothing is cached: a batch is its captions'
token ids, which the training step encodes with gradients (`TextSource.encode_ids`, inside the fast path's
captured step).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from lora_pipeline.core.models.loading import (
    BaseModel,
    encode_prompts,
    encode_token_ids,
    host_to_device,
    prompt_token_ids,
    sdxl_add_time_ids,
)
from lora_pipeline.core.training.inputs.augment import View
from lora_pipeline.core.training.inputs.data import DECODE_THREADS, TrainImage
from lora_pipeline.core.training.inputs.latent_cache import CacheStats, LatentDiskCache, entry_key
from lora_pipeline.core.training.inputs.text_cache import TextDiskCache
from lora_pipeline.core.training.seeds import Stream, torch_generator
from lora_pipeline.core.training.timing import StageTimes

T = TypeVar("T")


DECODE_AHEAD = 32  # images decoded ahead of the encoder at most: bounded memory for any dataset size


def prefetched(load: Callable[[T], torch.Tensor], items: Sequence[T]) -> Iterator[torch.Tensor]:
    """`load(item)` for each item in order, computed by a few threads ahead of the consumer: decoding and
    resizing a photo (Pillow releases the GIL) takes longer than encoding it on a GPU, so one thread starves it."""
    with ThreadPoolExecutor(max_workers=min(DECODE_THREADS, os.cpu_count() or 1)) as pool:
        pending: deque[Future[torch.Tensor]] = deque()
        for item in items:
            pending.append(pool.submit(load, item))
            if len(pending) >= DECODE_AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@torch.no_grad()
def encode_posterior(base: BaseModel, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE posterior's parameters (b, 2 * 4, h/8, w/8: mean and log-variance) in float32."""
    vae = base.vae
    return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters.float()


def sample_latents(base: BaseModel, posterior: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scaled latents drawn from a posterior, as kohya caches them (`latent_dist.sample()`): `(z - shift) * scale`,
    the shift FLUX's (0 for SD)."""
    sample = DiagonalGaussianDistribution(posterior).sample(generator=generator).float()
    if base.latents_shift_factor:
        sample = sample - base.latents_shift_factor
    return sample * base.latents_scaling_factor


def encode_latents(base: BaseModel, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scaled VAE latents (b, c, h/8, w/8) in float32, sampled from the posterior as kohya caches them."""
    return sample_latents(base, encode_posterior(base, pixels), generator)


class LatentSource:
    """Latents of training images: cached once (per orientation with flip_aug; on disk with `disk`), or encoded
    per step (seeded by the step) without a cache. `stats` counts VAE encodes and disk-cache hits and misses.

    With `background` the cache is filled by a thread of its own, on a CUDA stream of its own, the images of
    `first` first, while the training thread goes on (text encoding, the fast path's warm-up and captures:
    run/warmup.py): `batch` waits only for the latents it needs, `finish` for all of them. Each image's latents
    come from its own generator, so the order and the thread change no value. `busy_seconds` is the encoding's
    own time, `waited_seconds` what the caller spent in it.
    """

    def __init__(self, base: BaseModel, images: Sequence[TrainImage], seed: int, cache: bool, device: torch.device,
                 flip_aug: bool = False, disk: LatentDiskCache | None = None, first: Sequence[int] = (),
                 background: bool = False):
        self.base, self.images, self.seed, self.device = base, images, seed, device
        self.disk = disk
        self.stats = disk.stats if disk else CacheStats()
        self.cache: dict[tuple[int, bool], torch.Tensor] | None = None
        self.busy_seconds = self.waited_seconds = 0.0
        self._thread: threading.Thread | None = None
        self._ready = threading.Condition()
        self._error: BaseException | None = None
        self._done = self._stopping = False
        if not cache:
            return
        order = dict.fromkeys([*first, *range(len(images))])
        keys = [(index, flip) for index in order for flip in ((False, True) if flip_aug else (False,))]
        self.cache = {}
        started = time.perf_counter()
        if background:
            self._thread = threading.Thread(target=self._fill_in_background, args=(keys,), name="latent-cache",
                                            daemon=True)
            self._thread.start()
        else:
            self._fill(keys)
        self.waited_seconds += time.perf_counter() - started

    def _fill(self, keys: list[tuple[int, bool]], stream: torch.cuda.Stream | None = None) -> None:
        started = time.perf_counter()
        # Without a disk cache every image is decoded: a few threads decode ahead of the VAE (`prefetched`).
        decoded = prefetched(self._pixels, keys) if self.disk is None else (None for _ in keys)
        for key, pixels in zip(keys, decoded, strict=True):
            if self._stopping:
                break
            latents = self._cached(*key, pixels)
            if stream is not None:
                stream.synchronize()  # complete before another stream reads it
            with self._ready:
                self.cache[key] = latents  # type: ignore[index]
                self._ready.notify_all()
        self.busy_seconds += time.perf_counter() - started

    def _fill_in_background(self, keys: list[tuple[int, bool]]) -> None:
        try:
            stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                self._fill(keys, stream)
        except BaseException as exc:  # raised on the training thread by `batch` or `finish`
            self._error = exc
        finally:
            with self._ready:
                self._done = True
                self._ready.notify_all()

    def _wait_for(self, keys: Sequence[tuple[int, bool]]) -> None:
        cache = self.cache
        if self._thread is None or cache is None or all(key in cache for key in keys):
            return
        started = time.perf_counter()
        with self._ready:
            while not all(key in cache for key in keys):
                if self._error is not None:
                    raise self._error
                if self._done:
                    raise RuntimeError("the latent cache stopped before it had every image")
                self._ready.wait()
        self.waited_seconds += time.perf_counter() - started

    def finish(self) -> None:
        """Wait for every latent of the cache (raising the filling thread's error, if it failed)."""
        if self._thread is not None:
            started = time.perf_counter()
            self._thread.join()
            self.waited_seconds += time.perf_counter() - started
            if self._error is not None:
                raise self._error

    def close(self) -> None:
        """Stop filling the cache (after the image at hand) and wait for the thread: a run that fails meanwhile."""
        self._stopping = True
        if self._thread is not None:
            self._thread.join()

    def _posterior(self, pixels: torch.Tensor) -> torch.Tensor:
        self.stats.vae_encodes += 1
        return encode_posterior(self.base, pixels)

    def _pixels(self, key: tuple[int, bool]) -> torch.Tensor:
        index, flip = key
        image = self.images[index]
        return image.pixels(View(flip, image.crop_top_left))

    def _cached(self, index: int, flip: bool, pixels: torch.Tensor | None = None) -> torch.Tensor:
        image = self.images[index]
        if pixels is None:
            pixels = self._pixels((index, flip)) if self.disk is None else None
        posterior = None
        if self.disk is not None:
            key = entry_key(image.sha256, self.disk.vae_hash, image.bucket, image.resized, image.crop_top_left, flip,
                            str(self.base.vae.dtype).removeprefix("torch."))
            factor = self.base.vae_scale_factor
            shape = (2 * self.base.vae.config.latent_channels, image.bucket[1] // factor, image.bucket[0] // factor)
            posterior = self.disk.get(key, shape)
            if posterior is not None:
                posterior = posterior[None]
            else:
                posterior = self._posterior(self._pixels((index, flip))[None])
                self.disk.put(key, posterior[0])
        else:
            posterior = self._posterior(pixels[None])
        # The unflipped draw keeps the stream of runs before flip_aug existed, so their files do not change.
        generator = torch_generator(self.seed, Stream.LATENTS, index, *((1,) if flip else ()))
        return sample_latents(self.base, posterior.to(self.base.vae.device), generator)[0].to(self.device)

    def batch(self, indices: Sequence[int], global_step: int, views: Sequence[View] | None = None,
              rows: slice = slice(None)) -> torch.Tensor:
        """The latents of `rows` (default all) of the batch `indices`. Without a cache they are drawn for the whole
        batch, so a row gets the same latents whichever process of a DDP run encodes it (loop.Shard)."""
        wanted = range(len(indices))[rows]
        if self.cache is not None:
            keys = [(indices[n], bool(views and views[n].flip)) for n in wanted]
            self._wait_for(keys)
            return torch.stack([self.cache[key] for key in keys])
        pixels = torch.stack([self.images[indices[n]].pixels(views[n] if views else None) for n in wanted])
        posterior = self._posterior(pixels)
        whole = posterior.new_zeros((len(indices), *posterior.shape[1:]))
        whole[rows] = posterior
        generator = torch_generator(self.seed, Stream.LATENTS, 1 << 32, global_step)
        return sample_latents(self.base, whole, generator)[rows].to(self.device)


@dataclass
class TextConditioning:
    hidden: torch.Tensor | None  # encoder_hidden_states (b, 77, cross_attention_dim); None: `ids` instead
    pooled: torch.Tensor | None  # SDXL text_embeds (b, projection_dim); None for SD 1.5
    ids: list[torch.Tensor] | None = None  # each encoder's token ids (on the device), for the step to encode


class TextSource:
    """Text conditioning for captions; a per-caption cache when the same caption text recurs (no shuffling), read
    from and written to `disk` when given (text_cache.py).

    With `in_step` (captions that change every step, or encoders that `train`) a batch is its captions' token ids
    and the training step encodes them (`encode_ids`, StepParts.text_encode): on the fast path the encoders then
    run inside the captured step, one launch with the U-Net's, not a few hundred kernels launched from the host
    before every step (1.6 s of an SD 1.5 drill's 46 s of steps on an H100)."""

    def __init__(self, base: BaseModel, dtype: torch.dtype, device: torch.device, cache_captions: Sequence[str] = (),
                 times: StageTimes | None = None, train: bool = False, disk: TextDiskCache | None = None,
                 in_step: bool = False):
        self.base, self.dtype, self.device, self.train = base, dtype, device, train
        self.in_step = in_step or train
        self.times = times or StageTimes(device)
        self.cache: dict[str, TextConditioning] = {}
        for caption in dict.fromkeys(cache_captions):
            self.cache[caption] = self._encode([caption]) if disk is None else self._from_disk(disk, caption)

    def _outputs(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self.times.stage("text_encoding"):
            return encode_prompts(self.base, captions, grad=self.train)

    def _conditioning(self, hidden: torch.Tensor, pooled: torch.Tensor | None) -> TextConditioning:
        return TextConditioning(
            hidden.to(self.device, self.dtype), None if pooled is None else pooled.to(self.device, self.dtype)
        )

    def _encode(self, captions: list[str]) -> TextConditioning:
        return self._conditioning(*self._outputs(captions))

    def _from_disk(self, disk: TextDiskCache, caption: str) -> TextConditioning:
        """One caption's conditioning from its disk entry, encoded and stored first on a miss. The entry holds
        the encoders' outputs exactly (float32 copies), so both ways give the same conditioning."""
        found = disk.get(caption)
        if found is None:
            hidden, pooled = self._outputs([caption])
            disk.put(caption, hidden[0], None if pooled is None else pooled[0])
        else:
            hidden, pooled = found[0][None], None if found[1] is None else found[1][None]
        return self._conditioning(hidden, pooled)

    def encode_ids(self, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The conditioning of token ids made by `batch`: device work only, with gradients where the encoders train
        (StepParts.text_encode)."""
        hidden, pooled = encode_token_ids(self.base, ids)
        return hidden.to(self.device, self.dtype), None if pooled is None else pooled.to(self.device, self.dtype)

    def batch(self, captions: list[str]) -> TextConditioning:
        """The captions' conditioning; with `in_step`, their token ids for the step to encode."""
        if self.in_step:
            ids = [host_to_device(t, e.device) for t, e in zip(prompt_token_ids(self.base, captions),
                                                                 self.base.text_encoders, strict=True)]
            return TextConditioning(None, None, ids)
        if not all(c in self.cache for c in captions):
            return self._encode(captions)
        parts = [self.cache[c] for c in captions]
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return TextConditioning(torch.cat([p.hidden for p in parts]), pooled)


def time_ids(images: Sequence[TrainImage], dtype: torch.dtype, device: torch.device,
             views: Sequence[View] | None = None) -> torch.Tensor:
    """SDXL micro-conditioning per image: original (h, w), crop (top, left) (of its view, when given), target =
    bucket (h, w)."""
    rows = [
        sdxl_add_time_ids(
            (image.size[1], image.size[0]), views[n].crop_top_left if views else image.crop_top_left,
            (image.bucket[1], image.bucket[0]), 1, dtype, "cpu",
        )
        for n, image in enumerate(images)
    ]
    return host_to_device(torch.cat(rows), device)
