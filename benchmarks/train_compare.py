"""`train_throughput.py --compare N`: the trainer's step with the fast path off and on (and eager twice, the GPU's own
run-to-run spread) from the same weights, noise and batch, and how their losses and LoRA weights differ."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any

import torch


def _first_non_finite(losses: torch.Tensor) -> int | None:
    return next((i + 1 for i, v in enumerate(losses.tolist()) if not math.isfinite(v)), None)


def compare(shape: Any, args: argparse.Namespace, device: torch.device, trainer_step: Callable,
            release: Callable[[torch.device], None]) -> dict[str, Any]:
    """--compare N: N steps eager, N eager again (the GPU's own run-to-run spread) and N through the fast path,
    from the same weights, noise and batch (`trainer_step` of train_steps.py builds each run)."""
    runs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, variant in [("plain", "plain"), *args.compare_runs]:
        torch.manual_seed(0)  # the same random U-Net and LoRA initialisation for all
        step, prepare, params = trainer_step(shape, args, device, variant)
        prepare()
        losses = torch.stack([step(1 + index) for index in range(args.compare)]).float().cpu()
        print(f"[{shape.name} {name}] losses every 20 steps: {losses[::20].tolist()}", file=sys.stderr)
        runs[name] = (losses, torch.cat([p.detach().float().reshape(-1) for p in params]).cpu())
        del step, prepare, params
        release(device)
    plain, plain_lora = runs["plain"]

    def differences(other: str) -> dict[str, Any]:
        losses, lora = runs[other]
        differing = (plain != losses).nonzero()
        return {"first_differing_step": int(differing[0]) + 1 if len(differing) else None,
                "first_10_max_abs_difference": float((plain[:10] - losses[:10]).abs().max()),
                "max_abs_loss_difference": float((plain - losses).abs().max()),
                "mean_abs_loss_difference": float((plain - losses).abs().mean()),
                "identical_losses": bool(torch.equal(plain, losses)),
                "lora_rel_l2_difference": float((plain_lora - lora).norm() / plain_lora.norm())}

    return {
        "model": shape.name, "steps": args.compare, "batch": args.batch or shape.batch,
        "attention": ("math only, deterministic kernels" if args.deterministic else
                      "cuDNN allowed" if args.cudnn_attention else "flash / efficient / math (the trainer's)"),
        "mean_loss": {name: float(losses.mean()) for name, (losses, _) in runs.items()},
        "first_non_finite_step": {name: _first_non_finite(losses) for name, (losses, _) in runs.items()},
        **{f"plain_vs_{name}": differences(name) for name, _ in args.compare_runs},
    }
