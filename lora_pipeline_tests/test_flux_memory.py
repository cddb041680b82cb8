"""FLUX.1's memory options on the CPU: fp8_base (float8 weight storage), blocks_to_swap (models/offload.py) and
gradient checkpointing, each against the plain step, and through train_lora."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.models.families import model_family
from lora_pipeline.core.models.loading import load_base_model
from lora_pipeline.core.models.offload import FP8, BlockSwap, Fp8Linear, store_linears_in_fp8
from lora_pipeline.core.training.kohya.network import add_network, trainable
from lora_pipeline.core.training.recipe_groups import FlowSettings
from lora_pipeline.core.training.step.flux_step import RectifiedFlow
from lora_pipeline_tests.helpers import tiny_recipe, train
from lora_pipeline_tests.test_flux_training import FLUX, flux_snapshot  # noqa: F401  (the fixture)

FP8_LOSS_TOLERANCE = 0.05  # relative: e4m3 keeps 3 mantissa bits, each weight is off by at most 1/16


def loss_and_grads(base, setup=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One FLUX step's loss and LoRA gradients on fixed inputs, after `setup(transformer)`."""
    torch.manual_seed(0)
    add_network(base, tiny_recipe(**FLUX).network, 0)
    if setup is not None:
        setup(base.denoiser)
    base.denoiser.train()
    flow = RectifiedFlow.of(FlowSettings(), base.denoiser)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    noise, sigmas = flow.draw(tuple(latents.shape), generator)
    text = torch.randn(2, 7, 32, generator=generator), torch.randn(2, 32, generator=generator)
    loss = flow.loss(base.denoiser, latents, noise, sigmas, *text, mask=None, loss_weights=None)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainable(base).values()]


@pytest.fixture
def tiny_flux(tiny_model):
    return lambda: load_base_model(tiny_model("tiny-flux").parent, "tiny-flux", "flux1")


def test_fp8_base_stores_frozen_linears_in_float8_and_keeps_the_loss(tiny_flux):
    loss, grads = loss_and_grads(tiny_flux())
    base = tiny_flux()
    fp8_loss, fp8_grads = loss_and_grads(base, store_linears_in_fp8)
    fp8 = [m for m in base.denoiser.modules() if isinstance(m, Fp8Linear)]
    assert fp8 and all(m.weight.dtype == FP8 and m.compute_dtype == torch.float32 for m in fp8)
    assert all(p.dtype == torch.float32 for p in trainable(base).values())  # the LoRA is not in fp8
    assert any(type(m).__name__ == "Linear" and isinstance(m.base_layer, Fp8Linear)
               for m in base.denoiser.modules() if hasattr(m, "base_layer"))  # peft wraps the fp8 layers
    assert abs(fp8_loss - loss) <= FP8_LOSS_TOLERANCE * loss
    assert all(torch.isfinite(g).all() for g in fp8_grads) and len(fp8_grads) == len(grads)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_swap_runs_its_hooks_and_changes_nothing_on_cpu(tiny_flux, checkpointing):
    def plain(transformer):
        if checkpointing:
            transformer.enable_gradient_checkpointing()

    swaps = []

    def swapped(transformer):
        plain(transformer)
        swaps.append(BlockSwap(model_family("flux1").swapped_blocks(transformer, 2), torch.device("cpu")))

    loss, grads = loss_and_grads(tiny_flux(), plain)
    swap_loss, swap_grads = loss_and_grads(tiny_flux(), swapped)
    assert torch.equal(loss, swap_loss) and all(torch.equal(a, b) for a, b in zip(grads, swap_grads, strict=True))
    # 1 double + 2 single blocks: in before each forward and each backward, out after each
    assert swaps[0].hooks == {"in": 3 * 2, "out": 3 * 2}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_flux):
    loss, grads = loss_and_grads(tiny_flux())
    checkpointed_loss, checkpointed = loss_and_grads(tiny_flux(), lambda t: t.enable_gradient_checkpointing())
    assert torch.equal(loss, checkpointed_loss)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, checkpointed, strict=True))


def test_swapped_blocks_follow_kohya_split_and_refuse_too_many(tiny_flux):
    transformer = tiny_flux().denoiser
    blocks = model_family("flux1").swapped_blocks(transformer, 2)
    assert blocks == [transformer.transformer_blocks[1], *transformer.single_transformer_blocks]
    with pytest.raises(UserError, match="this transformer has 2 and 2"):
        model_family("flux1").swapped_blocks(transformer, 3)


def test_recipe_refuses_block_swap_without_blocks():
    with pytest.raises(ValueError, match="blocks_to_swap must be at most 0"):
        tiny_recipe(blocks_to_swap=2)
    with pytest.raises(ValueError, match="at most 35"):
        tiny_recipe(**FLUX, blocks_to_swap=36)


def test_train_lora_with_every_memory_option(flux_snapshot):  # noqa: F811
    plain, _ = train(flux_snapshot, tiny_recipe(**{**FLUX, "epochs": 1}), "plain")
    options = {"gradient_checkpointing": True, "blocks_to_swap": 2}
    light, _ = train(flux_snapshot, tiny_recipe(**{**FLUX, "epochs": 1, **options}), "light")
    fp8, _ = train(flux_snapshot, tiny_recipe(**{**FLUX, "epochs": 1, **options, "fp8_base": True}), "fp8")
    assert light.loss_history == pytest.approx(plain.loss_history, rel=1e-5)
    assert fp8.loss_history == pytest.approx(plain.loss_history, rel=FP8_LOSS_TOLERANCE)
    assert plain.peak_memory_gib == {}  # measured on a GPU only
    assert load_file(fp8.epochs[0]["file"]).keys() == load_file(plain.epochs[0]["file"]).keys()
