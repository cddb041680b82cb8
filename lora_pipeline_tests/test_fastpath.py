"""The fast path on CPU: the same compiled-block code path as on a GPU (dynamo + AOTAutograd, `aot_eager`
backend so it runs in seconds), against eager; the trainer's recipe switch, timings and warm-up bookkeeping."""

from __future__ import annotations

import functools
import os
from dataclasses import replace

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from safetensors.torch import load_file

from lora_pipeline.core.models.loading import host_to_device
from lora_pipeline.core.training import fastpath, trainer
from lora_pipeline.core.training.loop import NoiseSettings, StepBatch, make_accelerator, training_step
from lora_pipeline.core.training.lora_file import add_unet_lora
from lora_pipeline.core.training.optim import make_lr_scheduler, make_optimizer
from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline_tests.helpers import tiny_recipe, train

CPU = torch.device("cpu")
TINY_UNET = dict(sample_size=8, layers_per_block=1, block_out_channels=(32, 32), norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4)


def _losses(compiled: bool, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    unet.requires_grad_(False)
    add_unet_lora(unet, 4, 2.0)
    unet.train()
    if compiled:
        count = fastpath.compile_blocks(unet, backend="aot_eager")
        expected = sum(isinstance(m, (BasicTransformerBlock, ResnetBlock2D)) for m in unet.modules())
        assert count == expected > 0
    params = [p for p in unet.parameters() if p.requires_grad]
    recipe = Recipe(name="r", base_model="tiny-sd", optimizer="AdamW", learning_rate=1e-2)
    optimizer = make_optimizer(recipe, params, CPU)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    gen = torch.Generator().manual_seed(1)
    batch = StepBatch(torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen))
    losses = [
        float(training_step(unet, scheduler, batch, torch.Generator().manual_seed(step), NoiseSettings(),
                            accelerator=make_accelerator(CPU, "no"), optimizer=optimizer,
                            lr_scheduler=make_lr_scheduler(recipe, optimizer, steps), params=params))
        for step in range(steps)
    ]
    return losses, {k: v.detach().clone() for k, v in unet.state_dict().items() if "lora" in k}


def test_compiled_blocks_train_like_eager_and_keep_parameter_names():
    eager_losses, eager_lora = _losses(compiled=False)
    fast_losses, fast_lora = _losses(compiled=True)
    assert fast_lora.keys() == eager_lora.keys()  # in-place compile: the saved file's keys do not change
    assert all(v.dtype == torch.float32 for v in fast_lora.values())  # LoRA master weights stay float32
    # float32 on CPU: only the order of a few fused operations may differ, so agreement is to rounding
    torch.testing.assert_close(fast_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for name, tensor in eager_lora.items():  # Adam normalises updates: a near-zero gradient's last bit moves a
        torch.testing.assert_close(fast_lora[name], tensor, rtol=1e-4, atol=1e-5)  # weight by ~lr * 1e-3
    assert eager_losses[0] != eager_losses[-1]  # the steps did train


def test_compile_cache_lives_where_it_is_told(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    folder = fastpath.use_compile_cache(tmp_path / "cache" / "torch_compile")
    assert folder.is_dir() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert os.environ["TRITON_CACHE_DIR"] == str(folder / "triton")
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(folder)  # inductor reads it at compile time, after torch was imported


def test_host_to_device_is_a_plain_copy_off_cuda():
    tensor = torch.arange(6)
    moved = host_to_device(tensor, CPU)
    assert moved.device == CPU and torch.equal(moved, tensor)


def test_trainer_fast_path_switch_and_stage_timings(train_snapshot, monkeypatch):
    root = train_snapshot(n=3, repeats=1)
    monkeypatch.setattr(trainer, "compile_blocks", functools.partial(fastpath.compile_blocks, backend="aot_eager"))
    recipe = tiny_recipe(epochs=1, optimizer="AdamW", learning_rate=1e-2, validation_split=0.0)
    plain, _ = train(root, recipe, "plain")
    fast, _ = train(root, replace(recipe, fast_path=True), "fast")
    assert (plain.fast_path, fast.fast_path) == (False, True)
    assert (root.cache / "torch_compile").is_dir()
    torch.testing.assert_close(fast.loss_history, plain.loss_history, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(load_file(fast.epochs[0]["file"]), load_file(plain.epochs[0]["file"]),
                               rtol=1e-3, atol=1e-5)
    for result in (plain, fast):
        timings = result.timings
        assert {"load", "latent_caching", "text_encoding", "training_steps", "shape_warmup", "saving",
                "time_to_first_step"} <= set(timings)
        assert all(value >= 0 for value in timings.values())
        assert 0 < timings["shape_warmup"] <= timings["training_steps"] + timings["text_encoding"]
        assert result.images_trained == 3  # 3 images, 1 epoch, no repeats
