"""Fixtures shared by the tests; plain helpers are in helpers.py.

Every test process runs torch (and any other OpenMP user) on one thread: pytest-xdist runs two workers on two
cores, and even a single process on a loaded machine can spin for minutes in an OpenMP barrier otherwise. The
environment is set before anything imports torch, and subprocesses (the CLI, killed trainings) inherit it.
"""

from __future__ import annotations

import os

for _threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_threads] = "1"

import shutil  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import pytest  # noqa: E402

from lora_pipeline_tests.helpers import (  # noqa: E402
    DEMO_EPOCHS,
    DEMO_RECIPE,
    DEMO_V1,
    DEMO_V2,
    HandSnapshot,
    committed_data,
)

if TYPE_CHECKING:
    from lora_pipeline.core.paths import DataRoot
    from lora_pipeline.runs.outcome import RunOutcome


# --- a copy of the bundled sample data in a temporary data root (end-to-end tests) -----------------------------
@pytest.fixture
def sample_root(tmp_path, monkeypatch, tiny_model):
    """A data root holding copies of the committed sample sources, specs and recipes (from git, never the
    user's `data/`), and links to the worker's generated tiny models.

    LORA_PIPELINE_DATA points at it and DAGSTER_HOME at a fresh instance folder, so CLI and
    Dagster runs in the test touch nothing outside tmp_path.
    """
    from lora_pipeline.core.paths import DataRoot

    data = tmp_path / "data"
    for part in ("sources", "specs", "recipes"):
        shutil.copytree(committed_data() / part, data / part)
    (data / "models").mkdir()
    for name in ("tiny-sd", "tiny-sdxl"):
        os.symlink(tiny_model(name), data / "models" / name)
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("LORA_PIPELINE_DATA", str(data))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return DataRoot(data)


# --- hand-built snapshots: validation and report tests write datasets/<version>/ file by file ------------------
@pytest.fixture
def hand_snapshot(tmp_path) -> HandSnapshot:
    return HandSnapshot(tmp_path)


# --- tiny real images and source batches ----------------------------------------------------------------------
@pytest.fixture
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


@pytest.fixture
def make_batch():
    """`make_batch(root, batch, {relpath: bytes|str}, ready=True)`: write sources/<batch> (with _READY)."""

    def make(root, batch: str, files: dict, ready: bool = True) -> Path:
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


# --- test pictures: deterministic shapes for image, validation and report tests ------------------------------
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


@pytest.fixture
def picture():
    """`picture(seed, size=(96, 96), colour=None)`: a deterministic PIL test picture of shapes."""
    return _picture


# --- tiny base models: generated once per test worker (about 0.2 s each) -------------------------------------
@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model(name)`: the folder of the generated tiny model `name` (TINY_MODELS; shared by a worker's tests)."""
    from lora_pipeline.core.models.loading import ensure_tiny_model

    models = tmp_path_factory.mktemp("models")
    return lambda name: ensure_tiny_model(models, name)


# --- training snapshots: a small captioned snapshot and the tiny models under one data root -------------------
TRAIN_TAGS = ("red body", "blue body", "matte finish", "glossy finish", "front view", "side view", "round screen")
TRAIN_SIZES = ((96, 64), (64, 96), (80, 80), (64, 64), (112, 64), (72, 88))


def _train_snapshot(root, tiny_model, version: str = "train-v1", n: int = 4, repeats: int = 2):
    from lora_pipeline.core.datasets.snapshot.manifest import write_manifest
    from lora_pipeline.core.fileio import write_json
    from lora_pipeline.core.hashing import sha256_file
    from lora_pipeline.core.paths import SNAPSHOT

    root.models.mkdir(parents=True, exist_ok=True)
    for name in ("tiny-sd", "tiny-sdxl", "tiny-flux"):
        if not (root.models / name).exists():
            os.symlink(tiny_model(name), root.models / name)
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


@pytest.fixture
def train_snapshot(tmp_path, tiny_model):
    """`train_snapshot(version="train-v1", n=4, repeats=2)`: a DataRoot with a complete captioned snapshot.

    Images are shape pictures of several aspect ratios (so they fall into different buckets), captions
    "trg, <3-4 tags>", manifest rows for images and captions, snapshot.json with spec.repeats; the
    data root's models/ links to the worker's generated tiny models.
    """
    from lora_pipeline.core.paths import DataRoot

    root = DataRoot(tmp_path / "data")
    return lambda version="train-v1", n=4, repeats=2: _train_snapshot(root, tiny_model, version, n, repeats)


@pytest.fixture(scope="module")
def module_snapshot(tmp_path_factory, tiny_model):
    """`train_snapshot` shared by a test module's tests (their training runs write to separate folders)."""
    from lora_pipeline.core.paths import DataRoot

    root = DataRoot(tmp_path_factory.mktemp("module") / "data")
    return lambda version="train-v1", n=4, repeats=2: _train_snapshot(root, tiny_model, version, n, repeats)


# --- hand-built LoRA epochs: kohya files and an MLflow training run, without training ------------------------
@pytest.fixture
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
    from lora_pipeline.core.training.kohya.lora_file import (
        LoraProvenance,
        add_unet_lora,
        build_metadata,
        kohya_state_dict,
        save_lora,
    )
    from lora_pipeline.core.training.run.checkpoint import epoch_file_name
    from lora_pipeline.core.training.run.tracking import TrainingTracker

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


# --- the demo partition, built, trained and evaluated once per worker (tests marked DEMO_GROUP, helpers.py) ----
@dataclass(frozen=True)
class DemoRoot:
    root: DataRoot
    home: Path  # its DAGSTER_HOME

    def env(self) -> dict[str, str]:
        return {"LORA_PIPELINE_DATA": str(self.root.root), "DAGSTER_HOME": str(self.home)}


@dataclass(frozen=True)
class TrainedDemo(DemoRoot):
    trained: RunOutcome  # train_job of DEMO_V2 x DEMO_RECIPE
    evaluated: RunOutcome  # its evaluate_job


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory, tiny_model) -> Iterator[DemoRoot]:
    """A data root with the committed sources, the demo's two specs at 1 repeat (v2 copies v1: a two-step
    provenance chain) and the demo recipe cut to DEMO_EPOCHS epochs, 1 sample step and 1 weight (its two prompts
    kept: two grids); a Dagster instance with every partition registered (so the sensors of a `dg dev` over it
    find nothing new).

    Under $UI_SCREENSHOTS (`make screenshots`) it lies in ~/lora-pipeline-ui-demo (removed afterwards), so the
    README's screenshots show a path like a user's instead of pytest's temporary folder."""
    import yaml

    from lora_pipeline.core.paths import REPO_ROOT, DataRoot
    from lora_pipeline.defs import partitions
    from lora_pipeline.runs.instance import instance

    if os.environ.get("UI_SCREENSHOTS"):
        base = Path.home() / "lora-pipeline-ui-demo"
        base.mkdir()  # an existing folder is not ours to remove: fail instead
    else:
        base = tmp_path_factory.mktemp("demo")
    try:
        demo = DemoRoot(DataRoot(base / "data"), base / "dagster_home")
        shutil.copytree(committed_data() / "sources", demo.root.sources)
        for part, name in (("specs", DEMO_V1), ("specs", DEMO_V2), ("recipes", DEMO_RECIPE)):
            doc = yaml.safe_load((committed_data() / part / f"{name}.yaml").read_text())
            if part == "specs":
                doc.update(repeats=1)
            else:
                doc.update(epochs=DEMO_EPOCHS, sample_steps=1, eval_weights=[1.0])
            (demo.root.root / part).mkdir(exist_ok=True)
            (demo.root.root / part / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        demo.root.models.mkdir()
        os.symlink(tiny_model("tiny-sd"), demo.root.models / "tiny-sd")
        demo.home.mkdir()
        shutil.copy(REPO_ROOT / "dagster.yaml", demo.home / "dagster.yaml")
        with pytest.MonkeyPatch.context() as env:
            for key, value in demo.env().items():
                env.setenv(key, value)
            inst = instance()
            partitions.register(inst, partitions.source_batches, demo.root.ready_batches())
            partitions.register(inst, partitions.dataset_versions, [DEMO_V1, DEMO_V2])
            partitions.register(inst, partitions.training_runs, [partitions.training_key(DEMO_V2, DEMO_RECIPE)])
        yield demo
    finally:
        if os.environ.get("UI_SCREENSHOTS"):
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def trained_demo(demo_root) -> TrainedDemo:
    """`demo_root` with both versions built, DEMO_V2 x DEMO_RECIPE trained and evaluated, all through Dagster."""
    from lora_pipeline.defs.partitions import training_key
    from lora_pipeline.runs.instance import instance
    from lora_pipeline.runs.jobs import run_job

    with pytest.MonkeyPatch.context() as env:
        for key, value in demo_root.env().items():
            env.setenv(key, value)
        inst = instance()
        for version in (DEMO_V1, DEMO_V2):
            run_job("build_dataset_job", version, inst, quiet=True)
        key = training_key(DEMO_V2, DEMO_RECIPE)
        trained = run_job("train_job", key, inst, quiet=True)
        evaluated = run_job("evaluate_job", key, inst, quiet=True)
    return TrainedDemo(demo_root.root, demo_root.home, trained, evaluated)
