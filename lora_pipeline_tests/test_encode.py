"""LatentSource filling its cache in the background (on a GPU, beside the fast path's warm-up): the same latents as
filling it up front, in any order; a batch waits only for its own images; a failure reaches the training thread."""

from __future__ import annotations

import threading

import pytest
import torch

from lora_pipeline.core.models.loading import load_base_model
from lora_pipeline.core.training.inputs.data import load_training_data
from lora_pipeline.core.training.inputs.encode import LatentSource
from lora_pipeline_tests.helpers import tiny_recipe


@pytest.fixture
def inputs(train_snapshot):
    root = train_snapshot(n=6, repeats=1)
    base = load_base_model(root.models, "tiny-sd", "sd15")
    images = load_training_data(root.dataset("train-v1"), tiny_recipe().buckets, 0.0).images
    return base, images


def test_background_filling_gives_the_latents_of_filling_up_front_in_any_order(inputs):
    base, images = inputs
    cpu = torch.device("cpu")
    up_front = LatentSource(base, images, 7, True, cpu, flip_aug=True)
    background = LatentSource(base, images, 7, True, cpu, flip_aug=True, first=[4, 2], background=True)
    assert torch.equal(background.batch([4], 0), up_front.batch([4], 0))  # waits for this image only
    background.finish()
    assert list(background.cache)[:4] == [(4, False), (4, True), (2, False), (2, True)]  # `first` first
    assert set(background.cache) == set(up_front.cache)
    for key, latents in up_front.cache.items():
        assert torch.equal(background.cache[key], latents), key
    for index in range(len(images)):
        assert torch.equal(background.batch([index], 0), up_front.batch([index], 0))
    assert background.stats.vae_encodes == up_front.stats.vae_encodes == 2 * len(images)
    assert background.busy_seconds > 0 and up_front.waited_seconds > 0


def test_a_batch_waits_for_its_images_and_a_failure_reaches_the_waiting_thread(inputs, monkeypatch):
    base, images = inputs
    release = threading.Event()
    real = LatentSource._posterior

    def posterior(self, pixels):
        if self.stats.vae_encodes == 2:  # the third image: hold it, then fail
            release.wait(timeout=30)
            raise OSError("VAE gone")
        return real(self, pixels)

    monkeypatch.setattr(LatentSource, "_posterior", posterior)
    source = LatentSource(base, images, 7, True, torch.device("cpu"), first=[5, 0], background=True)
    assert source.batch([5], 0).shape[0] == source.batch([0], 0).shape[0] == 1  # it has these; the third is held
    waiting: list[BaseException] = []

    def wait_for_third() -> None:
        try:
            source.batch([1], 0)
        except OSError as exc:
            waiting.append(exc)

    waiter = threading.Thread(target=wait_for_third)
    waiter.start()
    waiter.join(timeout=0.5)
    assert waiter.is_alive() and not waiting  # still waiting for image 1
    release.set()
    waiter.join(timeout=30)
    assert [str(e) for e in waiting] == ["VAE gone"]
    with pytest.raises(OSError, match="VAE gone"):
        source.finish()


def test_close_stops_the_filling_thread(inputs, monkeypatch):
    base, images = inputs
    source = LatentSource(base, images, 7, True, torch.device("cpu"), background=True)
    source.close()
    assert not source._thread.is_alive()
    assert len(source.cache) <= len(images)


def test_captions_that_change_every_step_are_encoded_inside_the_step(train_snapshot, monkeypatch):
    """Shuffled captions: the step encodes their token ids (so the fast path captures the encoders with the
    U-Net); fixed captions: encoded once, up front. Counted at the encoders' two entry points."""
    from lora_pipeline.core.training.inputs import encode
    from lora_pipeline_tests.helpers import train

    calls = {"up_front": 0, "in_step": 0}
    up_front, in_step = encode.encode_prompts, encode.encode_token_ids

    def counted(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(encode, "encode_prompts", counted("up_front", up_front))
    monkeypatch.setattr(encode, "encode_token_ids", counted("in_step", in_step))
    root = train_snapshot(n=3, repeats=1)
    shuffled, _ = train(root, tiny_recipe(epochs=1, validation_split=0.0, shuffle_caption=True), "shuffled")
    assert calls == {"up_front": 0, "in_step": shuffled.total_steps}
    assert shuffled.timings["text_encoding"] == 0.0
    calls.update(up_front=0, in_step=0)
    fixed, _ = train(root, tiny_recipe(epochs=1, validation_split=0.0, shuffle_caption=False), "fixed")
    assert calls == {"up_front": 3, "in_step": 0}  # one per distinct caption
    assert fixed.timings["text_encoding"] > 0
