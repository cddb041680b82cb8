"""`trace_lora` / `format_provenance` on a hand-built data root: a batch, an earlier dataset, a snapshot, a LoRA."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_pipeline.core.datasets.snapshot.manifest import SEALED_FILES, write_manifest
from lora_pipeline.core.datasets.snapshot.seal import seal_snapshot
from lora_pipeline.core.datasets.spec import load_spec
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import write_json
from lora_pipeline.core.hashing import sha256_file
from lora_pipeline.core.lineage.provenance import trace_lora
from lora_pipeline.core.lineage.provenance_text import format_provenance
from lora_pipeline.core.models.loading import base_model_hash
from lora_pipeline.core.paths import (
    CAPTION_CHECK,
    CONTACT_SHEET,
    REPORT_JSON,
    REPORT_MD,
    REVIEW_PAGE,
    SNAPSHOT,
    DataRoot,
)
from lora_pipeline.core.training.kohya.lora_file import LoraProvenance, build_metadata, save_lora
from lora_pipeline.core.training.recipe import load_recipe

VERSION, FOLDER = "hand-v1", "img/2_hnd"
SPEC = """name: hand-v1
trigger: hnd
repeats: 2
sources:
  - batch: b1
  - dataset: hand-v0
merge: true
captions:
  from: sidecar
"""
RECIPE = "name: r1\nbase_model: tiny-sd\nmodel_family: sd15\nresolution: 64\nnetwork_dim: 4\nnetwork_alpha: 2\n"


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _rows(snap: Path, rel: str, source: dict, caption_source: dict, caption_from: str) -> list[dict]:
    """An image row and its caption row, as snapshot.py and captions.py write them."""
    image, caption = snap / rel, snap / rel.replace(".png", ".txt")
    image_row = {"path": rel, "kind": "image", "sha256": sha256_file(image), "bytes": image.stat().st_size,
                 "width": 24, "height": 16, **source}
    caption_row = {"path": rel.replace(".png", ".txt"), "kind": "caption", "sha256": sha256_file(caption),
                   "bytes": caption.stat().st_size, "image": rel, "caption_source": caption_from, **caption_source}
    return [image_row, caption_row]


@pytest.fixture
def traced(tmp_path, image_bytes, tiny_model):
    """A data root with batch b1, an earlier dataset hand-v0, snapshot hand-v1 and a LoRA trained on it."""
    root = DataRoot(tmp_path / "data")
    batch = root.batch("b1")
    _write(batch / "views/a.png", image_bytes(1))
    _write(batch / "views/a.txt", b"hnd, front view, teal body\n")
    _write(batch / "views/c.png", image_bytes(3))  # c came to hand-v1 through hand-v0
    _write(batch / "_READY", b"")
    v0 = root.dataset("hand-v0")
    shutil.copyfile(batch / "views/c.png", _write(v0 / f"{FOLDER}/c.png", b""))
    _write(v0 / f"{FOLDER}/c.txt", b"hnd, top view\n")

    snap = root.dataset(VERSION)
    shutil.copyfile(batch / "views/a.png", _write(snap / f"{FOLDER}/a.png", b""))
    _write(snap / f"{FOLDER}/a.txt", b"hnd, front view, teal body\n")
    shutil.copyfile(v0 / f"{FOLDER}/c.png", _write(snap / f"{FOLDER}/c.png", b""))
    _write(snap / f"{FOLDER}/c.txt", b"hnd, top view\n")
    a_sha, c_sha = sha256_file(batch / "views/a.png"), sha256_file(batch / "views/c.png")
    rows = _rows(snap, f"{FOLDER}/a.png",
                 {"source_batch": "b1", "source_path": "views/a.png", "source_sha256": a_sha,
                  "origin_batch": "b1", "origin_path": "views/a.png", "origin_sha256": a_sha},
                 {"source_batch": "b1", "source_path": "views/a.txt",
                  "source_sha256": sha256_file(batch / "views/a.txt")},
                 "sidecar:b1/views/a.txt")
    rows += _rows(snap, f"{FOLDER}/c.png",
                  {"source_dataset": "hand-v0", "source_path": f"{FOLDER}/c.png", "source_sha256": c_sha,
                   "origin_batch": "b1", "origin_path": "views/c.png", "origin_sha256": c_sha},
                  {"source_dataset": "hand-v0", "source_path": f"{FOLDER}/c.txt",
                   "source_sha256": sha256_file(v0 / f"{FOLDER}/c.txt")},
                  f"dataset:hand-v0/{FOLDER}/c.txt")
    manifest_root = write_manifest(snap, rows)
    _write(root.spec_file(VERSION), SPEC.encode())
    spec_sha = load_spec(root.spec_file(VERSION)).sha256
    write_json(snap / SNAPSHOT, {"version": VERSION, "manifest_root": manifest_root, "spec_sha256": spec_sha,
                                 "parents": ["hand-v0"], "code_version": "abc", "created_at": "2026-11-01T00:00:00",
                                 "captions_complete": True})
    for name in (CAPTION_CHECK, REPORT_JSON, REPORT_MD, CONTACT_SHEET, REVIEW_PAGE):
        _write(snap / name, b"{}")  # provenance reads none of them; the seal needs them present
    seal_snapshot(snap)
    recipe = load_recipe(_write(root.recipe_file("r1"), RECIPE.encode()))
    root.models.mkdir()
    os.symlink(tiny_model("tiny-sd"), root.models / "tiny-sd")  # as training records it: a model folder of the root
    base = str(root.models / "tiny-sd")

    def save(name: str = "hand-v1-r1-e002.safetensors", **overrides: str) -> Path:
        provenance = LoraProvenance(**{
            "dataset_version": VERSION, "manifest_root": manifest_root, "spec_sha256": spec_sha,
            "base_model_source": base, "base_model_hash": base_model_hash(base), "code_commit": "c0ffee",
            "mlflow_run_id": "run-7", **overrides})
        meta = build_metadata(recipe=recipe, provenance=provenance, epoch=2, steps=4, max_train_steps=8,
                              num_train_images=4, num_batches_per_epoch=2,
                              tag_frequency={"2_hnd": {"hnd": 2}},
                              dataset_dirs={"2_hnd": {"n_repeats": 2, "img_count": 2}},
                              training_started_at=1_790_000_000.0)
        path = root.loras(VERSION, "r1") / name
        save_lora(path, {"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.alpha": torch.tensor(2.0)},
                  meta)
        return path

    return root, save


def test_chain_matches_the_manifest_and_the_real_source_files(traced):
    root, save = traced
    lora = save()
    chain = trace_lora(root, lora)
    assert chain["status"] == "ok"
    assert chain["lora"]["sha256"] == sha256_file(lora) and chain["lora"]["epoch"] == "2"
    assert chain["recipe"]["file_status"] == "unchanged" and chain["recipe"]["as_trained"]["network_dim"] == 4
    assert chain["dataset"]["verified"] and chain["dataset"]["files_checked"] == 4 + len(SEALED_FILES)
    assert chain["dataset"]["header_manifest_root"] == chain["dataset"]["snapshot_manifest_root"]
    assert chain["base_model"]["status"] == "unchanged" and chain["code_commit"] == "c0ffee"
    assert chain["mlflow"] == {"run_id": "run-7", "tracking_uri": f"sqlite:///{root.mlflow / 'mlflow.db'}"}

    manifest = [json.loads(line) for line in (root.dataset(VERSION) / "manifest.jsonl").read_text().splitlines()]
    assert [(i["path"], i["sha256"]) for i in chain["images"]] == [
        (r["path"], r["sha256"]) for r in manifest if r["kind"] == "image"]
    a, c = chain["images"]
    assert a["caption"]["text"] == "hnd, front view, teal body" and c["caption"]["text"] == "hnd, top view"
    assert a["source"] == {"kind": "batch", "name": "b1", "path": "views/a.png",
                           "sha256": sha256_file(root.batch("b1") / "views/a.png"), "status": "unchanged"}
    assert c["source"]["kind"] == "dataset" and c["source"]["name"] == "hand-v0"
    assert c["origin"]["sha256"] == sha256_file(root.batch("b1") / "views/c.png")
    assert c["caption"]["from"] == f"dataset:hand-v0/{FOLDER}/c.txt" and c["caption"]["source"]["status"] == "unchanged"

    text = format_provenance(chain)
    assert f"LoRA {lora}" in text and "status: ok" in text
    assert "caption: hnd, front view, teal body" in text
    assert "from: batch b1: views/a.png" in text and "origin: batch b1: views/c.png" in text
    assert "caption source sidecar:b1/views/a.txt (sha256" in text
    assert "MLflow run run-7" in text and "code commit c0ffee" in text


def test_a_flipped_byte_in_the_snapshot_is_reported_plainly(traced):
    root, save = traced
    lora = save()
    image = root.dataset(VERSION) / FOLDER / "a.png"
    data = bytearray(image.read_bytes())
    data[40] ^= 0xFF
    image.write_bytes(bytes(data))
    chain = trace_lora(root, lora)
    finding = f"snapshot no longer matches its manifest: datasets/{VERSION}/{FOLDER}/a.png content changed"
    assert chain["status"] == [finding]
    assert not chain["dataset"]["verified"]
    text = format_provenance(chain)
    assert "snapshot DOES NOT MATCH its manifest" in text
    assert f"  - {finding}" in text


def test_changed_sources_recipe_spec_and_header_root_are_each_findings(traced):
    root, save = traced
    lora = save(manifest_root="0" * 64)
    (root.batch("b1") / "views/a.txt").write_text("hnd, side view\n")
    (root.batch("b1") / "views/c.png").unlink()
    with open(root.recipe_file("r1"), "a") as f:
        f.write("seed: 7\n")
    with open(root.spec_file(VERSION), "a") as f:
        f.write("intent: edited after the build\n")
    chain = trace_lora(root, lora)
    assert chain["status"] == [
        "recipe file recipes/r1.yaml changed since training (its sha256 differs)",
        f"header manifest root differs from the snapshot's: the LoRA was trained on 000000000000…, "
        f"datasets/{VERSION}/snapshot.json now says {chain['dataset']['snapshot_manifest_root'][:12]}…",
        f"spec file specs/{VERSION}.yaml changed since the snapshot was built",
        "source file sources/b1/views/a.txt changed since the snapshot hand-v1",
        "source file sources/b1/views/c.png no longer exists",
    ]


def test_missing_dataset_and_foreign_files_are_user_errors_or_findings(traced, tmp_path):
    root, save = traced
    lora = save(dataset_version="gone-v9", base_model_source=str(tmp_path / "deleted-model"))
    chain = trace_lora(root, lora)
    assert chain["images"] == [] and chain["base_model"]["status"] == "unavailable"
    assert chain["status"] == [
        "dataset version gone-v9 is missing: datasets/gone-v9/snapshot.json does not exist",
        f"base model cannot be checked: {tmp_path / 'deleted-model'}: base model folder not found",
    ]
    assert "0 images" in format_provenance(chain)
    plain = tmp_path / "plain.safetensors"
    save_lora(plain, {"w": torch.zeros(1)}, {"ss_network_dim": "4"})
    with pytest.raises(UserError, match="has no lora_pipeline provenance"):
        trace_lora(root, plain)
    (tmp_path / "x.safetensors").write_text("not a model")
    with pytest.raises(UserError, match="not a safetensors file"):
        trace_lora(root, tmp_path / "x.safetensors")


def test_a_flipped_tensor_byte_fails_provenance_naming_the_file(traced, monkeypatch):
    root, save = traced
    lora = save()
    data = bytearray(lora.read_bytes())
    data[-3] ^= 0x01  # the last tensor's bytes; the header (and its sshs_model_hash) is unchanged
    lora.write_bytes(bytes(data))
    finding = (f"LoRA file loras/{VERSION}/r1/{lora.name}: its tensors changed since it was written "
               "(the sshs_model_hash in its header no longer matches)")
    assert trace_lora(root, lora)["status"] == [finding]

    monkeypatch.setenv("LORA_PIPELINE_DATA", str(root.root))
    monkeypatch.setenv("DAGSTER_HOME", str(root.root.parent / "dagster_home"))
    exe = Path(sys.executable).with_name("lora-pipeline")
    result = subprocess.run([str(exe), "provenance", str(lora)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert [line for line in result.stdout.splitlines() if lora.name in line and "tensors changed" in line]
    assert "Traceback" not in result.stderr
