"""One LoRA Linear, forward and backward: peft's layer against the fused one (core/training/step/lora_fused.py).

    .venv/bin/python benchmarks/lora_layer.py [--rank 16] [--calls 20] [--smoke]

Each shape (tokens, in, out) is a frozen bf16 Linear with a float32 LoRA of --rank under bf16 autocast, as the
trainer has them (peft's input cast off, `norms.lora_inputs_uncast`); the gradient flows to the input and the LoRA.
Times are the mean of --calls calls after 3 untimed ones: CUDA events on a GPU, wall-clock on a CPU. The shapes
are FLUX.1's at 1024 px (4,608 tokens: attention projections, MLP up and down, single blocks' output) and SD 1.5's
at 512 px, batch 8 (the widest and the MLP of its transformer blocks); --smoke: small shapes, 2 calls (tests, CPU).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import sys
import time
from collections.abc import Callable

import torch
from peft import LoraConfig, inject_adapter_in_model

from lora_pipeline.core.training.step.lora_fused import fuse_lora_linears
from lora_pipeline.core.training.step.norms import lora_inputs_uncast

SHAPES = ((4608, 3072, 3072), (4608, 3072, 9216), (4608, 3072, 12288), (4608, 12288, 3072), (4608, 15360, 3072),
          (32768, 320, 320), (8192, 640, 5120))
SMOKE_SHAPES = ((64, 32, 48), (64, 48, 32))


class _One(torch.nn.Module):
    def __init__(self, features_in: int, features_out: int):
        super().__init__()
        self.linear = torch.nn.Linear(features_in, features_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def layers(features_in: int, features_out: int, rank: int, device: torch.device) -> tuple[torch.nn.Module, ...]:
    """(peft's, fused): the same frozen bf16 Linear and float32 LoRA weights."""
    torch.manual_seed(0)
    peft = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                              target_modules=["linear"]), _One(features_in, features_out))
    for name, param in peft.named_parameters():
        if "lora_" not in name:
            param.requires_grad_(False)
            param.data = param.data.to(torch.bfloat16)
    peft.to(device)
    lora_inputs_uncast(peft)
    fused = copy.deepcopy(peft)
    fuse_lora_linears(fused)
    return peft, fused


def mean_ms(call: Callable[[], None], calls: int, device: torch.device) -> float:
    for _ in range(3):
        call()
    if device.type != "cuda":
        started = time.perf_counter()
        for _ in range(calls):
            call()
        return (time.perf_counter() - started) * 1000 / calls
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(calls):
        call()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / calls


def _forward_backward(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out = layer(x)
    out.backward(grad)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    calls = 2 if args.smoke else args.calls
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{where} | torch {torch.__version__} | {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}"
          f"\n$ {' '.join(sys.argv)}\nrank {args.rank}, bf16 base, float32 LoRA, bf16 autocast; mean of {calls} "
          "calls, forward and backward")
    for tokens, features_in, features_out in SMOKE_SHAPES if args.smoke else SHAPES:
        x = torch.randn(1, tokens, features_in, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(1, tokens, features_out, device=device, dtype=torch.bfloat16)
        pair = layers(features_in, features_out, args.rank, device)
        times = {name: mean_ms(functools.partial(_forward_backward, layer, x, grad), calls, device)
                 for name, layer in zip(("peft", "fused"), pair, strict=True)}
        print(f"{tokens} tokens, {features_in} -> {features_out}: peft {times['peft']:.3f} ms, fused "
              f"{times['fused']:.3f} ms ({times['peft'] / times['fused']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
