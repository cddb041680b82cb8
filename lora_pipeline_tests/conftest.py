

# --- end-to-end fixtures (lead): a copy of the bundled sample data in a temporary data root -----------------
import os as _os  # noqa: E402
import shutil as _shutil  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

import pytest as _pytest  # noqa: E402

REPO_DATA = _Path(__file__).resolve().parents[1] / "data"


@_pytest.fixture
def sample_root(tmp_path, monkeypatch):
    """A data root holding copies of the committed sample sources, specs and recipes.

    LORA_PIPELINE_DATA points at it and DAGSTER_HOME at a fresh instance folder, so CLI and
    Dagster runs in the test touch nothing outside tmp_path.
    """
    from lora_pipeline.core.paths import DataRoot

    data = tmp_path / "data"
    for part in ("sources", "specs", "recipes"):
        _shutil.copytree(REPO_DATA / part, data / part)
    models = REPO_DATA / "models"
    if models.is_dir():  # reuse generated tiny models (they are deterministic) to save time
        (data / "models").mkdir()
        for name in ("tiny-sd", "tiny-sdxl"):
            if (models / name / "model_index.json").is_file():
                _os.symlink(models / name, data / "models" / name)
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("LORA_PIPELINE_DATA", str(data))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return DataRoot(data)


# --- hand-built snapshots (helper C): validation and report tests build datasets/<version>/ by hand --------
from dataclasses import dataclass as _dataclass  # noqa: E402
from dataclasses import field as _field  # noqa: E402
from typing import Any as _Any  # noqa: E402


@_dataclass
class HandCaptionPlan:
    """Stands in for captions.CaptionPlan: the fields validation and the report read."""

    captions: dict = _field(default_factory=dict)
    problems: list = _field(default_factory=list)
    tag_frequency: dict = _field(default_factory=dict)
    lint: dict = _field(default_factory=dict)


class HandSnapshot:
    """A snapshot folder written file by file, with manifest.jsonl and snapshot.json like snapshot.py's."""

    def __init__(self, tmp_path: _Path, version: str = "hand-v1", trigger: str = "hnd", repeats: int = 2) -> None:
        from lora_pipeline.core.paths import DataRoot

        self.root = DataRoot(tmp_path / "data")
        self.version, self.trigger, self.repeats = version, trigger, repeats
        self.dir = self.root.dataset(version)
        self.folder = f"img/{repeats}_{trigger}"
        (self.dir / self.folder).mkdir(parents=True)
        self.rows: list[dict[str, _Any]] = []
        self.plan = HandCaptionPlan()

    def spec(self, **checks: _Any):
        from lora_pipeline.core.datasets.spec import ChecksSpec, DatasetSpec, SourceRef

        return DatasetSpec(name=self.version, trigger=self.trigger, repeats=self.repeats,
                           sources=(SourceRef(batch="b1"),), checks=ChecksSpec(**checks))

    def add(self, name: str, content: _Any, caption: str | None = None, batch: str = "b1", **save: _Any) -> str:
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
        """Write the .txt beside an image and record it in the caption plan."""
        self.plan.captions[image_rel] = text
        (self.dir / image_rel).with_suffix(".txt").write_text(text, encoding="utf-8")

    def finish(self, problems: list | None = None) -> _Path:
        from lora_pipeline.core.datasets.manifest import SNAPSHOT, write_manifest
        from lora_pipeline.core.fileio import write_json

        root = write_manifest(self.dir, self.rows)
        write_json(self.dir / SNAPSHOT, {"version": self.version, "manifest_root": root, "problems": problems or []})
        return self.dir


@_pytest.fixture
def hand_snapshot(tmp_path) -> HandSnapshot:
    return HandSnapshot(tmp_path)


# --- source/snapshot fixtures (helper A): tiny real images, batches and tree fingerprints ------------------
@_pytest.fixture
def image_bytes():
    """`image_bytes(seed, fmt="PNG", size=(24, 16))`: a tiny real image whose pixels depend on `seed`."""
    import io

    from PIL import Image

    def make(seed: int = 0, fmt: str = "PNG", size: tuple[int, int] = (24, 16)) -> bytes:
        color = (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, fmt)
        return buf.getvalue()

    return make


@_pytest.fixture
def make_batch():
    """`make_batch(root, batch, {relpath: bytes|str}, ready=True)`: write sources/<batch> (with _READY)."""

    def make(root, batch: str, files: dict, ready: bool = True) -> _Path:
        top = root.batch(batch)
        for rel, data in files.items():
            path = top / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.encode() if isinstance(data, str) else data)
        top.mkdir(parents=True, exist_ok=True)
        if ready:
            (top / "_READY").write_text("")
        return top

    return make


@_pytest.fixture
def tree_fingerprint():
    """`tree_fingerprint(folder)`: {relpath: (sha256, mode, mtime_ns, inode)} of every entry, links not followed."""
    import hashlib

    def state(folder: _Path) -> dict:
        out = {}
        for path in sorted(folder.rglob("*")):
            st = path.lstat()
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                digest = "link:" + _os.readlink(path)
            elif path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                digest = "dir"
            out[rel] = (digest, st.st_mode, st.st_mtime_ns, st.st_ino)
        return out

    return state


# --- test pictures (helper C): deterministic shapes for image, validation and report tests ---------------
def _picture(seed: int, size: tuple[int, int] = (96, 96), colour: tuple[int, int, int] | None = None):
    """A deterministic RGB test picture of random shapes; `colour` paints every shape one colour."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    im = Image.new("RGB", size, (250, 250, 250))
    draw = ImageDraw.Draw(im)
    w, h = size
    for _ in range(6):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = (x0, y0, x0 + rng.randrange(w // 8, w // 2), y0 + rng.randrange(h // 8, h // 2))
        fill = colour or tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return im


@_pytest.fixture
def picture():
    """`picture(seed, size=(96, 96), colour=None)`: a deterministic PIL test picture of shapes."""
    return _picture


# --- tiny base models (helper D): generated once per test worker (about 0.2 s each) ---------------------
@_pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model(name)`: the folder of the generated `tiny-sd` / `tiny-sdxl` model (shared by a worker's tests)."""
    from lora_pipeline.core.models.loading import ensure_tiny_model

    models = tmp_path_factory.mktemp("models")
    return lambda name: ensure_tiny_model(models, name)


# --- training snapshots (helper E): a small captioned snapshot and the tiny models under one data root ----
TRAIN_TAGS = ("red body", "blue body", "matte finish", "glossy finish", "front view", "side view", "round screen")
TRAIN_SIZES = ((96, 64), (64, 96), (80, 80), (64, 64), (112, 64), (72, 88))


@_pytest.fixture
def train_snapshot(tmp_path, tiny_model):
    """`train_snapshot(version="train-v1", n=4, repeats=2)`: a DataRoot with a complete captioned snapshot.

    Images are shape pictures of several aspect ratios (so they fall into different buckets), captions
    "trg, <3-4 tags>", manifest rows for images and captions, snapshot.json with spec.repeats; the
    data root's models/ links to the worker's generated tiny models.
    """
    from lora_pipeline.core.datasets.manifest import SNAPSHOT, write_manifest
    from lora_pipeline.core.fileio import write_json
    from lora_pipeline.core.hashing import sha256_file
    from lora_pipeline.core.paths import DataRoot

    root = DataRoot(tmp_path / "data")

    def make(version: str = "train-v1", n: int = 4, repeats: int = 2) -> DataRoot:
        root.models.mkdir(parents=True, exist_ok=True)
        for name in ("tiny-sd", "tiny-sdxl"):
            if not (root.models / name).exists():
                _os.symlink(tiny_model(name), root.models / name)
        folder = f"img/{repeats}_trg"
        snapshot = root.dataset(version)
        (snapshot / folder).mkdir(parents=True)
        rows = []
        for i in range(n):
            size = TRAIN_SIZES[i % len(TRAIN_SIZES)]
            rel = f"{folder}/im{i}.png"
            _picture(100 + i, size).save(snapshot / rel)
            digest = sha256_file(snapshot / rel)
            rows.append({"path": rel, "kind": "image", "sha256": digest, "bytes": (snapshot / rel).stat().st_size,
                         "width": size[0], "height": size[1], "source_batch": "b1", "source_path": f"im{i}.png",
                         "source_sha256": digest})
            tags = [TRAIN_TAGS[(i + k) % len(TRAIN_TAGS)] for k in range(3 + i % 2)]
            cap = f"{folder}/im{i}.txt"
            (snapshot / cap).write_text(", ".join(["trg", *tags]) + "\n", encoding="utf-8")
            rows.append({"path": cap, "kind": "caption", "sha256": sha256_file(snapshot / cap),
                         "bytes": (snapshot / cap).stat().st_size, "image": rel,
                         "caption_source": f"sidecar:b1/im{i}.txt"})
        manifest_root = write_manifest(snapshot, rows)
        spec = {"name": version, "trigger": "trg", "repeats": repeats}
        write_json(snapshot / SNAPSHOT, {"version": version, "spec": spec, "spec_sha256": "f" * 64,
                                         "manifest_root": manifest_root, "captions_complete": True})
        return root

    return make


# --- hand-built LoRA epochs (helper F): kohya files + an MLflow training run, without training ------------
@_pytest.fixture
def lora_epochs():
    """`lora_epochs(root, recipe, version="train-v1", epochs=3, scale=0.3, steps_per_epoch=4, losses=None)`.

    Writes `loras/<version>/<recipe>/<version>-<recipe>-eNNN.safetensors` the way the trainer names and
    heads them (D's add_unet_lora / kohya_state_dict / build_metadata / save_lora), with random LoRA
    up-weights growing with the epoch (epoch e: e * scale * fixed noise) so later epochs change images
    more. A finished MLflow training run in `root.mlflow` holds the per-step `loss` metric (`losses`,
    default a slow decline); its id is in every header. Returns the run id.
    """
    import torch
    from diffusers import UNet2DConditionModel

    from lora_pipeline.core.models.loading import resolve_base_model
    from lora_pipeline.core.training.checkpoint import epoch_file_name
    from lora_pipeline.core.training.lora_file import (
        LoraProvenance,
        add_unet_lora,
        build_metadata,
        kohya_state_dict,
        save_lora,
    )
    from lora_pipeline.core.training.tracking import TrainingTracker

    def make(root, recipe, version: str = "train-v1", epochs: int = 3, scale: float = 0.3,
             steps_per_epoch: int = 4, losses: list | None = None) -> str:
        total = epochs * steps_per_epoch
        losses = losses if losses is not None else [1.0 - 0.01 * i for i in range(total)]
        tracker = TrainingTracker(root.mlflow)
        with tracker.run(f"{version}/{recipe.name}", params=recipe.resolved()) as run_id:
            tracker.log_steps(losses, [1e-3] * len(losses))
        source = resolve_base_model(root.models, recipe.base_model)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
        with torch.random.fork_rng(devices=[]):  # peft draws the down-projections from the global RNG
            torch.manual_seed(7)
            add_unet_lora(unet, recipe.network_dim, recipe.network_alpha)
        generator = torch.Generator().manual_seed(7)
        ups = {n: torch.randn(p.shape, generator=generator) for n, p in unet.named_parameters() if "lora_B" in n}
        provenance = LoraProvenance(version, "root", "spec", source, "hash", "commit", run_id)
        for epoch in range(1, epochs + 1):
            with torch.no_grad():
                for name, param in unet.named_parameters():
                    if name in ups:
                        param.copy_(ups[name] * scale * epoch)
            metadata = build_metadata(
                recipe=recipe, provenance=provenance, epoch=epoch, steps=epoch * steps_per_epoch,
                max_train_steps=total, num_train_images=8, num_batches_per_epoch=steps_per_epoch,
                tag_frequency={}, dataset_dirs={}, training_started_at=1_700_000_000.0,
            )
            tensors = kohya_state_dict(unet, recipe.model_family, recipe.network_alpha)
            path = root.loras(version, recipe.name) / epoch_file_name(version, recipe.name, epoch)
            save_lora(path, tensors, metadata)
        return run_id

    return make


# --- threads (lead): pytest-xdist runs two workers on two cores; two torch threads each would oversubscribe
if _os.environ.get("PYTEST_XDIST_WORKER"):
    import torch as _torch

    _torch.set_num_threads(1)


# --- finishing a built snapshot (helper fsa): captions, report and seal, as caption_set and dataset_report do --
def finish_version(root, spec):
    """Complete `datasets/<spec.name>` after build_snapshot with the real steps of caption_set and
    dataset_report (captions, manifest caption rows, report files, seal); returns the seal."""
    from lora_pipeline.core.datasets.captions import plan_captions, write_captions
    from lora_pipeline.core.datasets.manifest import record_captions
    from lora_pipeline.core.datasets.report import write_report
    from lora_pipeline.core.datasets.seal import seal_snapshot
    from lora_pipeline.core.datasets.validation import validate_dataset

    snapshot_dir = root.dataset(spec.name)
    plan = plan_captions(root, spec, snapshot_dir)
    record_captions(snapshot_dir, write_captions(snapshot_dir, plan))
    write_report(snapshot_dir, validate_dataset(root, spec, snapshot_dir, plan, workers=1), plan)
    return seal_snapshot(snapshot_dir)
