"""What the GPU drill (gpu_e2e.py) feeds the pipeline: the generated handoff of images of real sizes in mixed aspect
ratios with trigger-first captions in one tag schema, the dataset spec that takes them in, and the recipe of each
drilled model family at its real resolution (or the tiny models' for --smoke).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from lora_pipeline.core.paths import DataRoot

TRIGGER = "hdaesth"
BATCH = "drill-renders"
VERSION = "drill-v1"
PROMPT = f"{TRIGGER}, three-quarter view, coral red body, glossy finish, dome lid, lit round screen, two buttons"
TAGS = {
    "view": ["front view", "side view", "three-quarter view", "top view"],
    "body": [f"{c} body" for c in ("sage green", "coral red", "slate blue", "cream white", "charcoal gray",
                                    "mustard yellow", "dusty pink", "teal")],
    "finish": ["matte finish", "glossy finish"],
    "lid": ["dome lid", "flat lid", "transparent reservoir"],
    "screen": ["lit round screen", "dark round screen", "lit wide screen", "dark wide screen"],
    "buttons": ["two buttons", "three buttons"],
}
# (width, height): SDXL's training sizes and their SD 1.5 halves, so buckets differ per image.
FULL_SIZES = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
              (768, 768), (640, 896)]
SMOKE_SIZES = [(64, 64), (96, 64), (64, 96), (80, 64)]


def generate_images(out: Path, count: int, sizes: list[tuple[int, int]], seed: int = 0) -> None:
    """`count` distinct images (a colour field, shapes, noise) with sidecar captions, in a handoff folder."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        colours = rng.uniform(0, 255, (3, 3))
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * x / width + np.sin(angle) * y / height + 1) / 2
        image = colours[0] + (colours[1] - colours[0]) * ramp[..., None]
        for _ in range(4):  # a few ellipses at random places
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(0.05, 0.3) * height, rng.uniform(0.05, 0.3) * width
            mask = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
            image[mask] = rng.uniform(0, 255, 3)
        image += rng.normal(0, 6, image.shape)
        name = f"render-{index:04d}"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(out / f"{name}.jpg", quality=90)
        tags = [str(rng.choice(options)) for options in TAGS.values()]
        (out / f"{name}.txt").write_text(", ".join([TRIGGER, *tags]) + "\n", encoding="utf-8")
    (out / "_READY").write_text("", encoding="utf-8")


def write_spec(root: DataRoot, min_side: int) -> None:
    spec = {
        "name": VERSION, "intent": "GPU drill: generated renders of real sizes in mixed aspect ratios",
        "trigger": TRIGGER, "repeats": 1, "sources": [{"batch": BATCH}], "merge": False,
        "captions": {"from": "sidecar", "vocabulary": [t for options in TAGS.values() for t in options],
                     "banned": ["appliance"]},
        "checks": {"min_side": min_side, "max_aspect": 2.5, "near_duplicates": "warn"},
    }
    root.spec_file(VERSION).write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")


def recipe(name: str, family: str, base_model: str, epochs: int, smoke: bool, fast_path: bool | None,
           checkpointing: bool = False) -> dict[str, Any]:
    """kohya-style settings at the model's real resolution; evaluation kept small (1 prompt, 2 epochs);
    `checkpointing`: gradient checkpointing in the U-Nets' recipes too (FLUX.1's always has it)."""
    resolution = {"sd15": 512, "sdxl": 1024, "flux1": 1024}[family] if not smoke else 64
    settings = _flux_settings(smoke) if family == "flux1" else {
        "train_batch_size": {"sd15": 8, "sdxl": 4}[family],
        "network_dim": 32 if not smoke else 4, "network_alpha": 16 if not smoke else 2,
        "optimizer": "DAdaptAdamW", "learning_rate": 1.0, "shuffle_caption": True, "keep_tokens": 1,
        "eval_max_epochs": 2, **({"gradient_checkpointing": True} if checkpointing else {}),
    }
    return {
        "name": name, "base_model": base_model, "model_family": family, "resolution": resolution,
        "enable_bucket": True, "min_bucket_reso": resolution // 2, "max_bucket_reso": resolution * 2,
        "bucket_reso_steps": 64 if not smoke else 16, "epochs": epochs,
        "save_every_n_epochs": max(1, epochs // 4), "lr_scheduler": "constant",
        "mixed_precision": "bf16", "cache_latents": True, "seed": 42,
        "sample_prompts": [PROMPT], "sample_steps": 8 if not smoke else 2, "eval_weights": [1.0],
        "validation_split": 0.1, **settings, **({} if fast_path is None else {"fast_path": fast_path}),
    }


def _flux_settings(smoke: bool) -> dict[str, Any]:
    """FLUX.1 [dev] on one H100: batch 1, rank 16, AdamW, fp8 base weights and gradient checkpointing; fixed
    captions, so their T5 outputs are encoded once and kept in memory. The tiny model trains its double-stream
    blocks only (diffusers cannot load a tiny single block) and reads 64 T5 tokens, not [dev]'s 512."""
    return {
        "train_batch_size": 1, "network_dim": 16 if not smoke else 4, "network_alpha": 16 if not smoke else 2,
        "optimizer": "AdamW", "learning_rate": 1e-4, "shuffle_caption": False, "gradient_checkpointing": True,
        "fp8_base": True, "train_blocks": "all" if not smoke else "double",
        "t5xxl_max_token_length": 512 if not smoke else 64, "guidance_scale": 3.5, "eval_max_epochs": 1,
    }
