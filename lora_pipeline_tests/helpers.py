"""Helpers shared by several test modules (fixtures are in conftest.py). Import as `lora_pipeline_tests.helpers`."""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lora_pipeline.core.datasets.captions.captions import CaptionCheck
from lora_pipeline.core.training.recipe import Recipe

# --- the committed sample data ----------------------------------------------------------------------------------


@functools.cache
def committed_data() -> Path:
    """The data folder as git has it (sources, specs, recipes from the index), in a temp folder of this process.

    Never the working folder's `data/`: a user's own batches, specs that the sensors wrote and edited samples
    there must not change what the tests see.
    """
    from lora_pipeline.core.paths import REPO_ROOT

    dest = Path(tempfile.mkdtemp(prefix="committed-data-"))
    atexit.register(shutil.rmtree, dest, True)
    files = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "-z", "--", "data"],
                           capture_output=True, check=True).stdout
    subprocess.run(["git", "-C", str(REPO_ROOT), "checkout-index", f"--prefix={dest}/", "--stdin", "-z"],
                   input=files, capture_output=True, check=True)
    return dest / "data"


# The demo partition that conftest's `trained_demo` builds, trains and evaluates once per worker; the tests that
# take it are marked `pytest.mark.xdist_group(DEMO_GROUP)`, so make test's `--dist loadgroup` runs them on one.
DEMO_GROUP = "trained_demo"
DEMO_V1, DEMO_V2, DEMO_RECIPE = "hardware-design-aesthetic-v1", "hardware-design-aesthetic-v2", "demo-tiny"
DEMO_EPOCHS = 2


def land_batch(root, batch: str, colors: list[str]) -> None:
    """A new curated-style batch under sources/<batch>: one 640x576 image and sidecar per colour, _READY last."""
    from PIL import Image, ImageDraw

    folder = root.batch(batch)
    folder.mkdir(parents=True)
    for i, color in enumerate(colors):
        im = Image.new("RGB", (640, 576), "white")
        draw = ImageDraw.Draw(im)
        draw.ellipse((80 + 40 * i, 60, 560, 520 - 30 * i), fill=color)
        draw.rectangle((250, 200 + 20 * i, 400, 330), fill="black")
        im.save(folder / f"late-{i}.png")
        (folder / f"late-{i}.txt").write_text(f"hdaesth, front view, {color} body, matte finish\n")
    (folder / "_READY").write_text("")


def captioned_batch(root, batch: str, seeds: list[int], rights: str | None = None) -> Path:
    """sources/<batch>: one 64x64 shape picture and sidecar caption "trg, ..." per seed, _READY, and `rights` (YAML
    text) as its `_RIGHTS.yaml` when given. Build it with a spec of trigger `trg` and `checks: {min_side: 32}`."""
    import random

    from PIL import Image, ImageDraw

    folder = root.batch(batch)
    folder.mkdir(parents=True)
    for seed in seeds:
        rng = random.Random(seed)
        im = Image.new("RGB", (64, 64), (250, 250, 250))
        draw = ImageDraw.Draw(im)
        for _ in range(5):
            x, y = rng.randrange(48), rng.randrange(48)
            draw.rectangle((x, y, x + rng.randrange(8, 30), y + rng.randrange(8, 30)),
                           fill=tuple(rng.randrange(256) for _ in range(3)))
        im.save(folder / f"{batch}-{seed}.png")
        (folder / f"{batch}-{seed}.txt").write_text(f"trg, shape {seed}, front view\n")
    if rights is not None:
        (folder / "_RIGHTS.yaml").write_text(rights)
    (folder / "_READY").write_text("")
    return folder


def write_spec(root, name: str, sources: list[dict[str, Any]], **fields: Any):
    """specs/<name>.yaml with trigger `trg`, repeats 2, sidecar captions and small images allowed; the loaded spec."""
    import yaml

    from lora_pipeline.core.datasets.spec import load_spec

    data = {"name": name, "trigger": "trg", "repeats": 2, "sources": sources,
            "checks": {"min_side": 32, "near_duplicates": "ignore"}, **fields}
    root.specs.mkdir(parents=True, exist_ok=True)
    root.spec_file(name).write_text(yaml.safe_dump(data, sort_keys=False))
    return load_spec(root.spec_file(name))


# --- sensors, evaluated as the daemon does -------------------------------------------------------------------


def sensor_context(inst, root, cursor: str | None = None):
    """A context as the daemon's code server builds one: from an instance ref, with the repository (so a run
    request for a partition the same tick adds is resolved against the tick's partition requests), and the
    cursor the sensor's previous tick left."""
    import dagster as dg

    from lora_pipeline.defs.resources import DataRootResource
    from lora_pipeline.runs.instance import definitions

    return dg.SensorEvaluationContext(
        instance_ref=inst.get_ref(), instance=inst, last_tick_completion_time=None, last_run_key=None, cursor=cursor,
        repository_name="__repository__", repository_def=definitions().get_repository_def(),
        resources={"data_root": DataRootResource(path=str(root.root))},
    )


def sensor_tick(name: str, context):
    """One evaluation of the named sensor of the definitions, with the daemon's checks of its run requests
    (their jobs must be the sensor's, their partition keys known or added by the same tick)."""
    from lora_pipeline.runs.instance import definitions

    return definitions().get_repository_def().get_sensor_def(name).evaluate_tick(context)


def first_look(inst, root) -> str | None:
    """The cursor of a first tick of `source_batch_sensor`: its look at the arriving batches (safe arrival). With
    $LORA_PIPELINE_ARRIVAL_SETTLE_SECONDS at 0, a tick given this cursor registers those that did not change."""
    return sensor_tick("source_batch_sensor", sensor_context(inst, root)).cursor


# --- files ------------------------------------------------------------------------------------------------------


def tree_state(folder: Path) -> dict[str, tuple[str, int, int, int]]:
    """{relpath: (sha256 | "link:<target>" | "dir", mode, mtime_ns, inode)} of every entry under a folder,
    links not followed: equal before and after means not a byte, mode, time or inode changed."""
    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            digest = "link:" + os.readlink(path)
        elif path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest = "dir"
        out[path.relative_to(folder).as_posix()] = (digest, st.st_mode, st.st_mtime_ns, st.st_ino)
    return out


def make_read_only(folder: Path) -> None:
    """Take the write bits off a folder and everything under it (links left alone), as a careful user would."""
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.lstat().st_mode & ~0o222)


# --- services the tests start ----------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- a real full disk -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """`folder` (made if absent) as a tmpfs of `size` ("2m") for the block: a disk that fills up. Needs root."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


# --- the command line -------------------------------------------------------------------------------------------


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the console script as a user does, with the test's LORA_PIPELINE_DATA / DAGSTER_HOME."""
    exe = Path(sys.executable).with_name("lora-pipeline")
    result = subprocess.run([str(exe), *args], capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, never a traceback
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- hand-built snapshots: validation and report tests write datasets/<version>/ file by file ------------------


class HandSnapshot:
    """A snapshot folder written file by file, with manifest.jsonl and snapshot.json like snapshot.py's."""

    def __init__(self, tmp_path: Path, version: str = "hand-v1", trigger: str = "hnd", repeats: int = 2) -> None:
        from lora_pipeline.core.paths import DataRoot

        self.root = DataRoot(tmp_path / "data")
        self.version, self.trigger, self.repeats = version, trigger, repeats
        self.dir = self.root.dataset(version)
        self.folder = f"img/{repeats}_{trigger}"
        (self.dir / self.folder).mkdir(parents=True)
        self.rows: list[dict[str, Any]] = []
        self.check = CaptionCheck(captions={}, problems=[], lint={}, tag_frequency={})

    def spec(self, **checks: Any):
        from lora_pipeline.core.datasets.spec import ChecksSpec, DatasetSpec, SourceRef

        return DatasetSpec(name=self.version, trigger=self.trigger, repeats=self.repeats,
                           sources=(SourceRef(batch="b1"),), checks=ChecksSpec(**checks))

    def add(self, name: str, content: Any, caption: str | None = None, batch: str = "b1", **save: Any) -> str:
        """Write an image (a PIL image, saved with `save` options, or raw bytes); return its snapshot path."""
        from lora_pipeline.core.hashing import sha256_file

        rel = f"{self.folder}/{name}"
        path = self.dir / rel
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            content.save(path, **save)
        digest = sha256_file(path)
        self.rows.append({"path": rel, "kind": "image", "sha256": digest, "bytes": path.stat().st_size,
                          "source_batch": batch, "source_path": name, "source_sha256": digest})
        if caption is not None:
            self.caption(rel, caption)
        return rel

    def caption(self, image_rel: str, text: str) -> None:
        """Write the .txt beside an image and record it in the caption check."""
        self.check.captions[image_rel] = text
        (self.dir / image_rel).with_suffix(".txt").write_text(text, encoding="utf-8")

    def finish(self, problems: list | None = None) -> Path:
        from lora_pipeline.core.datasets.snapshot.manifest import write_manifest
        from lora_pipeline.core.fileio import write_json
        from lora_pipeline.core.paths import SNAPSHOT

        root = write_manifest(self.dir, self.rows)
        write_json(self.dir / SNAPSHOT, {"version": self.version, "manifest_root": root, "problems": problems or []})
        return self.dir


def finish_version(root, spec):
    """Complete `datasets/<spec.name>` after build_snapshot with the real steps of caption_set and
    dataset_report (captions, manifest caption rows, captions.json, report files, seal); returns the seal."""
    from lora_pipeline.core.datasets.captions.captions import (
        load_caption_check,
        plan_captions,
        write_caption_check,
        write_captions,
    )
    from lora_pipeline.core.datasets.checks.report import write_report
    from lora_pipeline.core.datasets.checks.validation import validate_dataset
    from lora_pipeline.core.datasets.snapshot.manifest import record_captions
    from lora_pipeline.core.datasets.snapshot.seal import seal_snapshot

    snapshot_dir = root.dataset(spec.name)
    plan = plan_captions(root, spec, snapshot_dir)
    rows = write_captions(snapshot_dir, plan)
    write_caption_check(snapshot_dir, plan)
    record_captions(snapshot_dir, rows)
    check = load_caption_check(snapshot_dir)
    write_report(snapshot_dir, validate_dataset(root, spec, snapshot_dir, check, workers=1), check)
    return seal_snapshot(snapshot_dir)


# --- training on the tiny models --------------------------------------------------------------------------------

PROVENANCE = {"code_commit": "test-commit", "mlflow_run_id": "test-run"}
STARTED_AT = 1_700_000_000.0
FINISHED_AT = STARTED_AT + 60  # the save time `train` gives (ss_training_finished_at): files are reproducible
TINY = {"name": "tiny", "base_model": "tiny-sd", "resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128,
        "bucket_reso_steps": 16, "epochs": 3, "train_batch_size": 2, "network_dim": 4, "network_alpha": 2.0,
        "mixed_precision": "no", "validation_split": 0.2}


@contextlib.contextmanager
def timesteps_seen() -> Iterator[list[Any]]:
    """While open, every timestep the U-Net's forward is called with is appended to the yielded list, as a flat
    CPU tensor (the forward wrapped, nothing replaced)."""
    import pytest
    import torch
    from diffusers import UNet2DConditionModel

    seen: list[torch.Tensor] = []
    forward = UNet2DConditionModel.forward

    def recording(self, sample, timestep, *args, **kwargs):
        seen.append(torch.as_tensor(timestep).detach().cpu().flatten())
        return forward(self, sample, timestep, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(UNet2DConditionModel, "forward", recording)
        yield seen


def recipe_refusal(tmp_path: Path, **fields: Any) -> str:
    """The one-line UserError that parsing TINY with `fields` gives (it names the recipe file)."""
    import pytest

    from lora_pipeline.core.errors import UserError
    from lora_pipeline.core.training.recipe import parse_recipe

    path = tmp_path / "r.yaml"
    with pytest.raises(UserError) as caught:
        parse_recipe({**TINY, "name": "r", **fields}, path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    return message


def assert_same_tensors(path_a: Any, path_b: Any) -> None:
    """Two safetensors files hold the same tensors bit for bit (their headers may differ: run ids, recipes)."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Crash(Exception):
    """Raised by `crash_after`'s log: a training stopped at a chosen moment, as a kill would stop it."""


def crash_after(epoch: int) -> Callable[[str], None]:
    """A training `log` that stops the run once it logs epoch `epoch`'s summary line (its files are saved)."""
    def log(line: str) -> None:
        if line.startswith(f"epoch {epoch}/"):
            raise Crash(line)

    return log


FAMILIES = {"tiny-sd": "sd15", "tiny-sdxl": "sdxl", "tiny-flux": "flux1"}  # the tiny models' model_family


def tiny_recipe(**overrides: Any) -> Recipe:
    return Recipe(**{**TINY, **overrides})


def train(root, recipe: Recipe, out: str, version: str = "train-v1", **kwargs: Any):
    """train_lora on the conftest `train_snapshot` version (or `version`) on the CPU: (result, progress lines)."""
    from lora_pipeline.core.training.run.trainer import train_lora

    lines: list[str] = []
    kwargs.setdefault("log", lines.append)
    kwargs.setdefault("clock", lambda: FINISHED_AT)
    result = train_lora(root, version, recipe, out_dir=root.root / out, provenance=PROVENANCE,
                        started_at=STARTED_AT, device="cpu", **kwargs)
    return result, lines


# --- LoRA weight deltas: a loaded adapter against the trained one, module by module ------------------------------


def lora_layers(model: Any, adapter: str) -> list[tuple[str, Any]]:
    """(name, peft LoraLayer) of every module of `model` that carries `adapter`."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


def merged_delta(module: Any, adapter: str) -> Any:
    """Merged weight - base weight of one adapter of a peft LoraLayer, the module restored after."""
    import torch

    with torch.no_grad():
        weight = module.get_base_layer().weight
        base = weight.clone()
        module.merge(adapter_names=[adapter])
        delta = weight - base
        module.unmerge()
        weight.copy_(base)
    return delta


def assert_same_deltas(model: Any, loaded: str = "file", trained: str = "ours") -> None:
    """Every module's delta of the loaded adapter is the trained adapter's: no module missing, none extra."""
    import torch

    layers = dict(lora_layers(model, trained))
    assert sorted(name for name, _ in lora_layers(model, loaded)) == sorted(layers)
    for name, module in layers.items():
        want = merged_delta(module, trained)
        assert want.abs().max() > 0
        torch.testing.assert_close(merged_delta(module, loaded), want, msg=name)
