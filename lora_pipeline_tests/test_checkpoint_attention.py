"""Gradient checkpointing under a non-default attention context (issue 27): the recomputation in the backward
runs under the SDPA kernels the forward ran under, wherever the backward is called (on CUDA another kernel
saves other tensors and torch raises CheckpointError), and gives the same gradients as no checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lora_pipeline.core.models.families import model_family
from lora_pipeline.core.models.loading import load_base_model
from lora_pipeline.core.training.kohya.network import add_network, trainable
from lora_pipeline.core.training.run.memory import checkpoint, lighten_denoiser, sdpa_backends
from lora_pipeline_tests.helpers import tiny_recipe

ONLY_MATH = (SDPBackend.MATH,)


@pytest.fixture
def attention_calls(monkeypatch) -> list[tuple[SDPBackend, ...]]:
    """The SDPA kernels allowed at each attention call (scaled_dot_product_attention runs as before)."""
    seen: list[tuple[SDPBackend, ...]] = []
    real = F.scaled_dot_product_attention

    def observed(*args, **kwargs):
        seen.append(tuple(sdpa_backends()))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", observed)
    return seen


class Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.proj(x).view(x.shape[0], 2, x.shape[1], 12).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v).reshape(x.shape[0], x.shape[1], 8)


def test_a_checkpointed_block_recomputes_under_the_forwards_kernels(attention_calls):
    block, x = Attention(), torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    with sdpa_kernel([SDPBackend.MATH]):
        plain = block(x).square().sum()
    plain.backward()
    expected = block.proj.weight.grad.clone()
    block.zero_grad()
    attention_calls.clear()
    with sdpa_kernel([SDPBackend.MATH]):
        loss = checkpoint(block, x).square().sum()
    loss.backward()  # outside the context: torch's own checkpoint recomputed with every kernel allowed
    assert attention_calls == [ONLY_MATH, ONLY_MATH]  # the forward and its recomputation
    assert torch.equal(loss, plain) and torch.allclose(block.proj.weight.grad, expected, rtol=1e-6, atol=1e-7)


def _unet_grads(tiny_model, checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = load_base_model(tiny_model("tiny-sd").parent, "tiny-sd", "sd15")
    torch.manual_seed(0)
    add_network(base, tiny_recipe().network, 0)
    lighten_denoiser(base.denoiser, model_family("sd15"), tiny_recipe(gradient_checkpointing=checkpointing),
                     torch.device("cpu"))
    unet = base.denoiser.train()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator)
    with sdpa_kernel([SDPBackend.MATH]):
        loss = unet(latents, torch.tensor([10, 500]), text).sample.square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainable(base).values()]


def test_the_recipes_checkpointing_recomputes_the_unet_under_the_forwards_kernels(tiny_model, attention_calls):
    loss, grads = _unet_grads(tiny_model, checkpointing=False)
    forward_calls = len(attention_calls)
    assert forward_calls and set(attention_calls) == {ONLY_MATH}
    attention_calls.clear()
    checkpointed_loss, checkpointed = _unet_grads(tiny_model, checkpointing=True)
    assert len(attention_calls) > forward_calls  # blocks were recomputed in the backward ...
    assert set(attention_calls) == {ONLY_MATH}  # ... under the forward's kernels
    assert torch.equal(loss, checkpointed_loss)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, checkpointed, strict=True))
