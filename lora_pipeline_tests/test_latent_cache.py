"""cache_latents_to_disk on the tiny model: a second run encodes nothing and writes the same files; entries are
shared across recipes, checked on read, and never trusted across a changed VAE."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_pipeline.core.models.model_hash import weights_hash
from lora_pipeline.core.training.kohya.lora_file import read_lora_metadata
from lora_pipeline_tests.helpers import tiny_recipe, train


def epoch_bytes(result) -> list[bytes]:
    return [Path(e["file"]).read_bytes() for e in result.epochs]


def test_disk_cache_second_run_encodes_nothing_and_gives_identical_files(train_snapshot, tiny_model):
    root = train_snapshot(n=3, repeats=1)
    recipe = tiny_recipe(epochs=1, validation_split=0.0, cache_latents_to_disk=True)
    first, _ = train(root, recipe, "a")
    assert first.latent_cache == {"hits": 0, "misses": 3, "rejected": 0, "vae_encodes": 3}
    entries = sorted((root.cache / "latents").rglob("*.safetensors"))
    assert len(entries) == 3
    second, _ = train(root, recipe, "b")
    assert second.latent_cache == {"hits": 3, "misses": 0, "rejected": 0, "vae_encodes": 0}
    assert epoch_bytes(second) == epoch_bytes(first)
    assert read_lora_metadata(Path(first.epochs[0]["file"]))["ss_cache_latents"] == "True"

    # Another recipe over the same images and buckets reuses the entries; a damaged entry is encoded again;
    # flip_aug caches each image mirrored too (kohya's latents_flipped): three more entries.
    damaged = entries[0]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    lines: list[str] = []
    other, _ = train(root, replace(recipe, name="other", seed=7, flip_aug=True), "c", log=lines.append)
    assert other.latent_cache == {"hits": 2, "misses": 4, "rejected": 1, "vae_encodes": 4}
    assert len(list((root.cache / "latents").rglob("*.safetensors"))) == 6
    assert any("does not match what it should hold" in line for line in lines)
    third, _ = train(root, recipe, "d")  # the rewritten entry is whole again
    assert third.latent_cache["hits"] == 3 and epoch_bytes(third) == epoch_bytes(first)

    # A base model whose VAE weights differ shares no entry.
    changed = root.models / "tiny-sd-vae2"
    shutil.copytree(tiny_model("tiny-sd"), changed)
    vae_file = changed / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(vae_file)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, vae_file)
    assert weights_hash(str(changed), "vae") != weights_hash(str(tiny_model("tiny-sd")), "vae")
    fresh, _ = train(root, replace(recipe, base_model=str(changed)), "e")
    assert fresh.latent_cache == {"hits": 0, "misses": 3, "rejected": 0, "vae_encodes": 3}
    assert all(torch.isfinite(torch.tensor(fresh.loss_history)))


def test_a_bf16_vae_names_its_own_entries_and_float32_keeps_the_old_names():
    """bf16 encoding (vae_encoding_dtype) gives other posteriors than float32: they must never be read for each
    other; float32 entries keep the names they had before the dtype counted."""
    from lora_pipeline.core.hashing import sha256_json
    from lora_pipeline.core.models.loading import vae_encoding_dtype
    from lora_pipeline.core.training.inputs.latent_cache import FORMAT, entry_key

    args = ("a" * 64, "b" * 64, (512, 768), (512, 770), (0, 1), False)
    before = sha256_json({"format": FORMAT, "image_sha256": args[0], "vae_hash": args[1], "bucket": [512, 768],
                          "resized": [512, 770], "crop_top_left": [0, 1], "flip": False})
    assert entry_key(*args) == entry_key(*args, "float32") == before
    assert entry_key(*args, "bfloat16") != before
    assert vae_encoding_dtype("bf16", no_half_vae=False) == torch.bfloat16
    assert vae_encoding_dtype("bf16", no_half_vae=True) == vae_encoding_dtype("fp16", no_half_vae=False) == \
        vae_encoding_dtype("no", no_half_vae=False) == torch.float32
