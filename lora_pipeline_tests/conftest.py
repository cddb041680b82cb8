

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
        from lora_pipeline.core.spec import ChecksSpec, DatasetSpec, SourceRef

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
        from lora_pipeline.core.manifest import SNAPSHOT, write_json, write_manifest

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
    from lora_pipeline.core.models import ensure_tiny_model

    models = tmp_path_factory.mktemp("models")
    return lambda name: ensure_tiny_model(models, name)
