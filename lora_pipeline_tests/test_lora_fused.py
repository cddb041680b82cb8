import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from lora_pipeline.core.training.step.lora_fused import fuse_lora_linears


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(32, 48)
        self.down = torch.nn.Linear(48, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _lora_net(base_dtype: torch.dtype, use_dora: bool = False) -> torch.nn.Module:
    """rank 4, alpha 8 (scale 2); the trained weights float32 and non-zero, the frozen base in `base_dtype`."""
    torch.manual_seed(0)
    net = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", use_dora=use_dora,
                                             target_modules=["up", "down"]), _Net())
    for name, param in net.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(param, std=0.1)
        else:
            param.requires_grad_(False)
            param.data = param.data.to(base_dtype)
    return net


def _run(net: torch.nn.Module, autocast: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = net(x)
    out.float().pow(2).sum().backward()
    return out.detach().float(), x.grad, [p.grad for p in net.parameters() if p.requires_grad]


def _ops(net: torch.nn.Module, autocast: bool) -> int:
    with torch.profiler.profile() as prof:
        _run(net, autocast)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def _max_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_float32_fused_layers_compute_peft_function_and_gradients_in_fewer_ops():
    peft_net = _lora_net(torch.float32)
    fused = copy.deepcopy(peft_net)
    assert fuse_lora_linears(fused) == 2
    want, got = _run(peft_net, False), _run(fused, False)
    assert _max_relative(got[0], want[0]) < 1e-6
    assert _max_relative(got[1], want[1]) < 1e-6
    for a, b in zip(got[2], want[2], strict=True):
        assert a.dtype == torch.float32 and _max_relative(a, b) < 1e-6
    assert _ops(fused, False) < _ops(peft_net, False)


def test_bf16_base_under_autocast_differs_from_peft_by_rounding_only():
    """The trainer's setting: frozen bf16 base, float32 LoRA weights, bf16 autocast. peft rounds the base's and the
    branch's outputs, the scaled branch and their sum to bf16 (three roundings), the fused layer once: the results
    differ within bf16's precision (2^-8 relative per rounding), the gradients reach the float32 weights."""
    peft_net = _lora_net(torch.bfloat16)
    fused = copy.deepcopy(peft_net)
    fuse_lora_linears(fused)
    want, got = _run(peft_net, True), _run(fused, True)
    assert got[0].dtype == torch.float32 and _max_relative(got[0], want[0]) < 3 * 2**-8
    assert _max_relative(got[1], want[1]) < 4 * 2**-8
    for a, b in zip(got[2], want[2], strict=True):
        assert a.dtype == torch.float32 and _max_relative(a, b) < 4 * 2**-8


@pytest.mark.parametrize("change", ["disabled", "merged", "dropout_hook", "float32_base_under_autocast"])
def test_what_the_fused_layer_does_not_cover_takes_peft_forward(change):
    peft_net = _lora_net(torch.float32)
    fused = copy.deepcopy(peft_net)
    fuse_lora_linears(fused)
    for net in (peft_net, fused):
        if change == "disabled":
            net.up.enable_adapters(False)
        elif change == "merged":
            net.up.merge()
        elif change == "dropout_hook":  # kohya's dropouts are hooks on the down projection (kohya/dropout.py)
            net.up.lora_A["default"].register_forward_hook(lambda module, args, out: out * 0.5)
    autocast = change == "float32_base_under_autocast"
    want, got = _run(peft_net, autocast), _run(fused, autocast)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_dora_layers_are_left_to_peft():
    net = _lora_net(torch.float32, use_dora=True)
    before = _run(copy.deepcopy(net), False)
    fuse_lora_linears(net)
    assert torch.equal(_run(net, False)[0], before[0])
