"""Issue 27, first block: wrong answers and reads outside the data root, each attack tried on a real version
(hardware-masked-reg-v1: curated images, masked close-ups, class images) and a LoRA really trained on it (tiny
SD, 3 epochs, CPU), built and trained once for the module. Each test puts back what it changed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import safetensors.torch
import yaml

from lora_pipeline.core.datasets.captions.captions import plan_captions
from lora_pipeline.core.datasets.checks.gate import require_passed_report
from lora_pipeline.core.datasets.snapshot.seal import seal_snapshot, verify_version
from lora_pipeline.core.datasets.snapshot.snapshot import build_snapshot
from lora_pipeline.core.datasets.sources import hashcache
from lora_pipeline.core.datasets.spec import load_spec
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.evaluation.evaluate import RECOMMENDATION_JSON, evaluate_lora
from lora_pipeline.core.lineage.provenance import trace_lora
from lora_pipeline.core.lineage.provenance_text import format_provenance
from lora_pipeline.core.paths import REPO_ROOT, SEAL, DataRoot
from lora_pipeline.core.training.inputs.data import load_training_data
from lora_pipeline.core.training.inputs.latent_cache import LatentDiskCache
from lora_pipeline.core.training.recipe import load_recipe
from lora_pipeline.core.training.run.checkpoint import epoch_file_name
from lora_pipeline.core.training.run.tracking import TrainingTracker
from lora_pipeline.core.training.run.trainer import train_lora
from lora_pipeline.runs.instance import definitions
from lora_pipeline_tests.helpers import committed_data, finish_version

VERSION, RECIPE, CURATED = "hardware-masked-reg-v1", "demo-tiny-masked", "hardware-design-aesthetic-v1"
SECRET = b"SECRET-FROM-OUTSIDE-THE-DATA-ROOT"


@dataclass(frozen=True)
class Trained:
    root: DataRoot
    outside: Path  # a folder beside the data root, never under it

    @property
    def snapshot(self) -> Path:
        return self.root.dataset(VERSION)

    def epoch(self, n: int) -> Path:
        return self.root.loras(VERSION, RECIPE) / epoch_file_name(VERSION, RECIPE, n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model) -> Trained:
    base = tmp_path_factory.mktemp("hardening")
    root, outside = DataRoot(base / "data"), base / "outside"
    outside.mkdir()
    for part in ("sources", "specs", "recipes"):
        shutil.copytree(committed_data() / part, root.root / part)
    root.models.mkdir()
    os.symlink(tiny_model("tiny-sd"), root.models / "tiny-sd")
    _edit_yaml(root.spec_file(VERSION), repeats=1)
    _edit_yaml(root.recipe_file(RECIPE), epochs=3, eval_weights=[1.0], sample_steps=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hashcache, "RACY_NS", 0)  # the batches were copied just now: cache their hashes anyway
        for version in (VERSION, CURATED):
            spec = load_spec(root.spec_file(version))
            build_snapshot(root, spec, "test")
            finish_version(root, spec)
    recipe = load_recipe(root.recipe_file(RECIPE))
    train_lora(
        root,
        VERSION,
        recipe,
        out_dir=root.loras(VERSION, RECIPE),
        provenance={"code_commit": "test"},
        tracker=TrainingTracker(root.mlflow),
        log=lambda _: None,
        device="cpu",
    )
    return Trained(root, outside)


def _edit_yaml(path: Path, **changes) -> None:
    doc = yaml.safe_load(path.read_text())
    doc.update(changes)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


@contextmanager
def replaced(path: Path, by: Path | bytes | None = None) -> Iterator[Path]:
    """`path` replaced for the body by a symbolic link to `by` (a path), by other bytes, or removed; put back
    afterwards, bytes and mode."""
    kept = path.with_name(path.name + ".kept")
    os.rename(path, kept)
    try:
        if isinstance(by, Path):
            os.symlink(by, path)
        elif by is not None:
            path.write_bytes(by)
        yield kept
    finally:
        if os.path.lexists(path):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        os.rename(kept, path)


def _flip_byte(path: Path, offset: int = 100) -> bytes:
    data = path.read_bytes()
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1 :]


# --- provenance ----------------------------------------------------------------------------------------------------


def test_provenance_covers_class_images_masks_and_their_captions_and_flags_each_flipped_source(trained):
    chain = trace_lora(trained.root, trained.epoch(3))
    assert chain.status == "ok" and len(chain.images) == 11 + 3  # the training images and the class images
    kinds = [image.kind for image in chain.images]
    assert kinds.count("image") == 11 and kinds.count("reg_image") == 3
    assert sorted(image.mask.source.path for image in chain.images if image.mask) == [
        "close-01-teal.mask.png",
        "close-02-mustard.mask.png",
        "close-03-charcoal.mask.png",
    ]
    reg = next(image for image in chain.images if image.kind == "reg_image")
    assert reg.caption.caption_source == "class_tokens:appliance" and reg.caption.text == "appliance"
    assert reg.source.name == "class-images-2026-12" and reg.source.status == "unchanged"

    class_image = trained.root.batch("class-images-2026-12") / "class-01.png"
    mask = trained.root.batch("masked-closeups-2026-12") / "close-01-teal.mask.png"
    with replaced(class_image, _flip_byte(class_image)), replaced(mask, _flip_byte(mask)):
        chain = trace_lora(trained.root, trained.epoch(3))
    assert sorted(chain.status) == [
        "source file sources/class-images-2026-12/class-01.png changed since the snapshot hardware-masked-reg-v1",
        "source file sources/masked-closeups-2026-12/close-01-teal.mask.png changed since the snapshot "
        "hardware-masked-reg-v1",
    ]
    assert "status: 2 finding(s)" in format_provenance(chain)


def test_a_snapshot_caption_linked_outside_the_root_is_a_finding_and_its_target_is_never_shown(trained):
    secret = trained.outside / "secret.txt"
    secret.write_bytes(SECRET)
    caption = trained.snapshot / "img/1_hdaesth/close-01-teal.txt"
    with replaced(caption, secret):
        chain = trace_lora(trained.root, trained.epoch(3))
        text, document = format_provenance(chain), json.dumps(chain.to_json_dict())
    assert SECRET.decode() not in text and SECRET.decode() not in document
    assert (
        "caption datasets/hardware-masked-reg-v1/img/1_hdaesth/close-01-teal.txt is a symbolic link, not "
        "followed; its text was not read"
    ) in chain.status
    linked = next(image for image in chain.images if image.path == "img/1_hdaesth/close-01-teal.png")
    assert linked.caption.text is None


def test_control_characters_in_a_caption_are_printed_escaped(trained):
    caption = trained.snapshot / "img/1_hdaesth/close-01-teal.txt"
    with replaced(caption, b"hdaesth, \x1b[2J\x1b[31mteal body\r, front view\x00\n"):
        text = format_provenance(trace_lora(trained.root, trained.epoch(3)))
    assert not any(ch in text for ch in "\x1b\r\x00")
    assert "caption: hdaesth, \\x1b[2J\\x1b[31mteal body\\r, front view\\x00" in text


def test_renamed_epoch_files_are_found_by_provenance_and_refused_by_evaluate(trained):
    e2, e3 = trained.epoch(2), trained.epoch(3)
    swap = e2.with_name("swap")
    os.rename(e2, swap)
    os.rename(e3, e2)
    os.rename(swap, e3)
    try:
        chain = trace_lora(trained.root, e2)
        with pytest.raises(UserError) as refused:
            evaluate_lora(
                trained.root, VERSION, load_recipe(trained.root.recipe_file(RECIPE)), log=lambda _: None, device="cpu"
            )
    finally:
        os.rename(e2, swap)
        os.rename(e3, e2)
        os.rename(swap, e3)
    assert chain.lora.epoch == "3"
    assert chain.status == [
        f"LoRA file {e2.relative_to(trained.root.root)}: its name says epoch 2 but its header "
        "holds epoch 3 (renamed?); its weights are that epoch's"
    ]
    assert str(refused.value) in (
        f"{e}: its name says epoch {a} but its header holds epoch {b} (renamed?); rename it back or retrain"
        for e, a, b in ((e2, 2, 3), (e3, 3, 2))
    )


def _doctored(trained: Trained, name: str, **header: str) -> Path:
    """A copy of epoch 3 (outside the data root, where a user may keep a LoRA) with header values changed."""
    tensors = safetensors.torch.load_file(trained.epoch(3))
    with safetensors.safe_open(trained.epoch(3), "pt") as f:
        meta = f.metadata() | {f"lora_pipeline.{key}": value for key, value in header.items()}
    path = trained.outside / f"{name}.safetensors"
    safetensors.torch.save_file(tensors, path, metadata=meta)
    return path


def _model_in_a_batch(trained: Trained, name: str, shards: dict[str, str]) -> Path:
    """A base-model folder inside a handed-off batch whose U-Net shard index names `shards`."""
    unet = trained.root.batch("handoff-2026-12") / name / "unet"
    unet.mkdir(parents=True)
    index = {"metadata": {}, "weight_map": {f"w{i}": shard for i, shard in enumerate(shards)}}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    for shard, target in shards.items():
        if target:
            os.symlink(target, unet / shard)
    return unet.parent


def test_a_doctored_header_reads_nothing_outside_the_root_or_the_model_folders(trained):
    secret = trained.outside / "shadow"
    secret.write_bytes(SECRET)
    listing = _model_in_a_batch(trained, "listing", {str(secret): ""})
    linked = _model_in_a_batch(trained, "linked", {"model-00001.safetensors": str(secret)})
    shutil.copytree(trained.root.models / "tiny-sd", trained.outside / "model", symlinks=False)
    findings = {}
    for name, source in (("listing", listing), ("linked", linked), ("outside", trained.outside / "model")):
        chain = trace_lora(trained.root, _doctored(trained, name, base_model_source=str(source)))
        assert chain.base_model.status == "unavailable"
        findings[name] = [f for f in chain.status if f.startswith("base model cannot be checked")]
    index = listing / "unet/diffusion_pytorch_model.safetensors.index.json"
    assert findings == {
        "listing": [
            f"base model cannot be checked: {index}: names the shard '{secret}', not a file name inside unet/; not read"
        ],
        "linked": [
            f"base model cannot be checked: {linked}/unet/model-00001.safetensors: lies outside the data root "
            "and the model folders; not read"
        ],
        "outside": [
            f"base model cannot be checked: {trained.outside}/model/unet/diffusion_pytorch_model.safetensors: "
            "lies outside the data root and the model folders; not read"
        ],
    }


def test_a_header_whose_model_names_dev_zero_finishes_at_once(trained):
    zero = _model_in_a_batch(trained, "zero", {"model-00001.safetensors": "/dev/zero"})
    lora = _doctored(trained, "zero", base_model_source=str(zero))
    script = (
        "import sys; from pathlib import Path; from lora_pipeline.core.paths import DataRoot; "
        "from lora_pipeline.core.lineage.provenance import trace_lora; "
        "print(trace_lora(DataRoot(Path(sys.argv[1])), Path(sys.argv[2])).base_model.status)"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, str(trained.root.root), str(lora)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("provenance was still reading /dev/zero after 120 s")
    assert done.returncode == 0 and done.stdout.strip() == "unavailable", done.stderr


# --- the gate, verify, the hash cache, the latent cache ------------------------------------------------------------


def test_the_gate_and_training_refuse_an_image_or_a_folder_linked_to_an_identical_copy_outside(trained):
    require_passed_report(trained.root, VERSION)
    image = trained.snapshot / "img/1_hdaesth/close-02-mustard.png"
    copy = trained.outside / "close-02-mustard.png"
    shutil.copyfile(image, copy)
    with replaced(image, copy):
        with pytest.raises(UserError, match="not a regular file of the version"):
            require_passed_report(trained.root, VERSION)
        with pytest.raises(UserError, match="symbolic link, not followed"):
            load_training_data(trained.snapshot, load_recipe(trained.root.recipe_file(RECIPE)).buckets, 0.2)
    folder = trained.snapshot / "img/1_hdaesth"
    shutil.copytree(folder, trained.outside / "1_hdaesth")
    with replaced(folder, trained.outside / "1_hdaesth"), pytest.raises(UserError) as refused:
        require_passed_report(trained.root, VERSION)
    assert str(refused.value).startswith(f"{folder}: not a regular file of the version")


def test_verify_fails_without_a_seal_and_lists_a_fifo_and_an_empty_folder(trained, monkeypatch):
    monkeypatch.setenv("LORA_PIPELINE_DATA", str(trained.root.root))
    job = definitions().resolve_job_def("verify_snapshots_job")
    assert job.execute_in_process(instance=dg.DagsterInstance.ephemeral()).success
    snapshot = trained.root.dataset(CURATED)
    with replaced(snapshot / SEAL):
        ran = job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not ran.success
    seal_snapshot(snapshot)

    os.mkfifo(snapshot / "img/10_hdaesth/extra.png")
    (snapshot / "img/empty").mkdir()
    try:
        result = verify_version(snapshot)
    finally:
        os.unlink(snapshot / "img/10_hdaesth/extra.png")
        os.rmdir(snapshot / "img/empty")
    assert not result.ok and result.irregular == ["img/10_hdaesth/extra.png", "img/empty"]
    assert verify_version(snapshot).ok


def test_a_poisoned_hash_cache_entry_never_reaches_a_seal(trained, monkeypatch):
    monkeypatch.setattr(hashcache, "RACY_NS", 0)
    cache = hashcache.cache_file(trained.root, "curated-2026-10")
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    rows[0]["sha256"] = "0" * 64
    spec_text = trained.root.spec_file(CURATED).read_text().replace(f"name: {CURATED}", "name: poisoned-v1")
    trained.root.spec_file("poisoned-v1").write_text(spec_text)
    spec = load_spec(trained.root.spec_file("poisoned-v1"))
    poisoned = "".join(json.dumps(row) + "\n" for row in rows).encode()
    with replaced(cache, poisoned), pytest.raises(UserError) as refused:
        build_snapshot(trained.root, spec, "test")
    assert str(refused.value) == (
        f"{cache}: hash cache line 1 does not match its check (edited?); it is not "
        "trusted: delete the file (it is rebuilt)"
    )
    assert not trained.root.dataset("poisoned-v1").exists()
    rows[0].pop("check")  # a row without a check is not trusted either: the file is hashed again
    with replaced(cache, "".join(json.dumps(row) + "\n" for row in rows).encode()):
        build_snapshot(trained.root, spec, "test")
        finish_version(trained.root, spec)
    assert verify_version(trained.root.dataset("poisoned-v1")).ok


def test_a_latent_cache_entry_that_is_a_link_is_not_followed(trained):
    folder = trained.root.cache / "latents"
    entry = sorted(folder.glob("*/*.safetensors"))[0]
    shape = tuple(safetensors.torch.load_file(entry)["posterior"].shape)
    with safetensors.safe_open(entry, "pt") as f:
        vae_hash = f.metadata()["vae_hash"]
    copy = trained.outside / entry.name
    shutil.copyfile(entry, copy)
    lines: list[str] = []
    cache = LatentDiskCache(folder, vae_hash, lines.append)
    assert cache.get(entry.stem, shape) is not None
    with replaced(entry, copy):
        assert cache.get(entry.stem, shape) is None
    assert cache.stats.rejected == 1 and lines == [
        f"latent cache: {entry.name} does not match what it should hold; encoding it again"
    ]


# --- captions, evaluation ------------------------------------------------------------------------------------------


def test_control_characters_in_a_sidecar_are_a_blocking_lint_error_and_crlf_is_not(trained):
    batch = trained.root.batch("control-2026-12")
    batch.mkdir()
    image = (
        trained.root.batch("curated-2026-10")
        / sorted(p.name for p in trained.root.batch("curated-2026-10").glob("*.png"))[0]
    )
    for stem, caption in (("esc", b"hdaesth, front view\x1b[31m, teal body\x00\n"), ("crlf", b"hdaesth, top view\r\n")):
        shutil.copyfile(image, batch / f"{stem}.png")
        (batch / f"{stem}.txt").write_bytes(caption)
    (batch / "_READY").write_bytes(b"")
    spec_text = trained.root.spec_file(CURATED).read_text().replace(f"name: {CURATED}", "name: control-v1")
    trained.root.spec_file("control-v1").write_text(spec_text.replace("curated-2026-10", "control-2026-12"))
    spec = load_spec(trained.root.spec_file("control-v1"))
    build_snapshot(trained.root, spec, "test")
    plan = plan_captions(trained.root, spec, trained.root.dataset("control-v1"))
    control = [p for p in plan.problems if p["code"] == "caption_control_character"]
    assert [(p["file"], p["severity"]) for p in control] == [("img/10_hdaesth/esc.png", "error")]
    assert "(\\x00, \\x1b)" in control[0]["message"]


def test_a_kill_during_evaluation_leaves_no_half_folder_and_the_next_run_completes(trained):
    out = trained.root.evals(VERSION, RECIPE)
    shutil.rmtree(out, ignore_errors=True)  # no earlier evaluation: a half folder would be the killed run's
    script = (
        "import sys; from pathlib import Path; from lora_pipeline.core.paths import DataRoot; "
        "from lora_pipeline.core.training.recipe import load_recipe; "
        "from lora_pipeline.core.evaluation.evaluate import evaluate_lora; "
        "root = DataRoot(Path(sys.argv[1])); "
        "evaluate_lora(root, sys.argv[2], load_recipe(root.recipe_file(sys.argv[3])), device='cpu')"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(trained.root.root), VERSION, RECIPE],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not any(out.parent.rglob("grid_0.png")) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not out.exists() or (out / RECOMMENDATION_JSON).is_file()  # never grid_0.png and no recommendation

    result = evaluate_lora(
        trained.root, VERSION, load_recipe(trained.root.recipe_file(RECIPE)), log=lambda _: None, device="cpu"
    )
    assert result.out_dir == out and (out / RECOMMENDATION_JSON).is_file() and (out / "grid_0.png").is_file()
    assert [p.name for p in out.parent.iterdir()] == [RECIPE]  # the killed run's staging folder is gone
