"""Resume state: a run killed at any point continues from its last saved epoch and ends byte-identical.

After each saved epoch the trainer writes the epoch file (atomically), then `out_dir/.resume/state.pt`
(atomically): LoRA weights (with use_ema also their EMA shadow), optimizer and LR-scheduler state, epoch and
global step, the loss history, the records of the files saved so far, the start time and provenance written into
every header, and the key (recipe sha256, manifest root, base model hash, and with from_lora the starting file's
sha256) that must match for a run to resume. No RNG state is
kept: every random draw comes from generators seeded by (seed, epoch/step) (see seeds.py).

On start, epoch files that the state does not vouch for (beyond its epoch, or all of them when there is
no matching state) are removed, and step files beyond its step, as are temp files of interrupted writes:
they may come from a run with other settings or from a kill between the file and the state write.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from lora_pipeline.core.fileio import write_staged
from lora_pipeline.core.hashing import sha256_file

RESUME_DIR = ".resume"
STATE_FILE = "state.pt"
FORMAT = 1


def epoch_file_name(version: str, recipe: str, epoch: int) -> str:
    return f"{version}-{recipe}-e{epoch:03d}.safetensors"


def step_file_name(version: str, recipe: str, step: int) -> str:
    """kohya's save_every_n_steps name: `<output>-step<8 digits>`."""
    return f"{version}-{recipe}-step{step:08d}.safetensors"


@dataclass
class ResumeState:
    key: dict[str, str]  # recipe_sha256, manifest_root, base_model_hash
    epoch: int  # last completed and saved epoch
    global_step: int
    started_at: float
    provenance: dict[str, str]  # lora_pipeline.* values written into every file of the run
    saved: list[dict[str, Any]]  # {epoch, file (name in out_dir), steps, mean_loss, sha256} per saved epoch
    losses: list[float]  # per global step
    lrs: list[float]
    lora: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    format: int = field(default=FORMAT)
    ema: dict[str, torch.Tensor] | None = None  # use_ema: the shadow of the LoRA weights (step/ema.py)


def state_path(out_dir: Path) -> Path:
    return out_dir / RESUME_DIR / STATE_FILE


def stage_state(out_dir: Path, state: ResumeState) -> Path:
    """The state written and fsynced beside its place (fileio.write_staged); `commit_staged(it, state_path(..))`
    puts it there: after the epoch file it vouches for (saving.py writes the two at once)."""
    fields_as_they_are = {f.name: getattr(state, f.name) for f in fields(state)}  # `asdict` deep-copies tensors
    return write_staged(state_path(out_dir), lambda f: torch.save(fields_as_they_are, f))


def load_state(out_dir: Path) -> ResumeState | None:
    path = state_path(out_dir)
    if not path.is_file():
        return None
    data = torch.load(path, map_location="cpu", weights_only=True)
    if data.get("format") != FORMAT:
        return None
    return ResumeState(**data)


def _files_intact(out_dir: Path, state: ResumeState) -> bool:
    return all(
        (out_dir / rec["file"]).is_file() and sha256_file(out_dir / rec["file"]) == rec["sha256"] for rec in state.saved
    )


def resume_point(
    out_dir: Path, version: str, recipe: str, key: dict[str, str], log: Callable[[str], None]
) -> ResumeState | None:
    """The state to continue from (or None to start fresh), after removing every file it does not vouch for."""
    state = load_state(out_dir)
    if state is not None and state.key != key:
        log(f"resume state in {out_dir} is for another recipe, dataset or base model; starting from epoch 1")
        state = None
    if state is not None and not _files_intact(out_dir, state):
        log(f"saved epoch files in {out_dir} changed or went missing; starting from epoch 1")
        state = None
    if state is None:
        state_path(out_dir).unlink(missing_ok=True)
    keep = {rec["file"] for rec in state.saved} if state else set()
    pattern = re.compile(re.escape(f"{version}-{recipe}-e") + r"\d{3,}\.safetensors")
    steps = re.compile(re.escape(f"{version}-{recipe}-step") + r"(\d{8,})\.safetensors")
    last_step = state.global_step if state else 0
    for folder in (out_dir, out_dir / RESUME_DIR):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            step = steps.fullmatch(path.name) if folder == out_dir else None
            stale_epoch = folder == out_dir and pattern.fullmatch(path.name) and path.name not in keep
            stale_epoch = stale_epoch or (step is not None and int(step[1]) > last_step)
            interrupted = path.name.startswith(".") and path.name.endswith(".tmp")
            if path.is_file() and (stale_epoch or interrupted):
                log(f"removing {path.name} (not from a resumable run)")
                path.unlink()
    return state
