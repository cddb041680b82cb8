"""train_lora end to end on the tiny models: reproducible files, kohya headers, diffusers loading, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from lora_pipeline.core.errors import UserError
from lora_pipeline.core.training.kohya.lora_file import add_unet_lora, read_lora_metadata
from lora_pipeline.core.training.recipe import Recipe
from lora_pipeline.core.training.run.checkpoint import load_state
from lora_pipeline.core.training.run.trainer import train_lora
from lora_pipeline_tests.helpers import PROVENANCE, STARTED_AT, TINY, Crash, crash_after, tiny_recipe, train, tree_state


def file_bytes(result) -> dict[str, bytes]:
    return {Path(e["file"]).name: Path(e["file"]).read_bytes() for e in result.epochs}


def test_same_seed_gives_byte_identical_files_with_kohya_headers(train_snapshot):
    root = train_snapshot(n=5, repeats=2)
    recipe = tiny_recipe()
    first, lines = train(root, recipe, "a")
    second, _ = train(root, recipe, "b")
    assert [Path(e["file"]).name for e in first.epochs] == [f"train-v1-tiny-e00{i}.safetensors" for i in (1, 2, 3)]
    assert file_bytes(first) == file_bytes(second)
    assert len(first.loss_history) == first.total_steps == 3 * first.steps_per_epoch == first.epochs[-1]["steps"]
    assert all(torch.isfinite(torch.tensor(first.loss_history)))
    assert first.resumed_from_epoch == 0 and first.images_per_second > 0 and len(first.validation_images) == 1
    epoch_lines = [line for line in lines if "mean loss" in line]  # not the in-epoch progress lines
    assert [line.split(":")[0] for line in epoch_lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert "mean loss" in epoch_lines[0] and "images/s" in epoch_lines[0] and " lr " in epoch_lines[0]
    assert first.loss_curve.read_bytes().startswith(b"\x89PNG")

    path = Path(first.epochs[1]["file"])
    meta = read_lora_metadata(path)
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_network_dim"] == "4" and meta["ss_epoch"] == "2"
    assert meta["ss_steps"] == str(2 * first.steps_per_epoch) and meta["ss_num_train_images"] == "8"
    assert json.loads(meta["ss_tag_frequency"])["2_trg"]["trg"] == 4
    assert meta["lora_pipeline.manifest_root"] == json.loads((root.dataset("train-v1") / "snapshot.json")
                                                             .read_text())["manifest_root"]
    assert meta["lora_pipeline.recipe_sha256"] == recipe.sha256
    assert meta["lora_pipeline.mlflow_run_id"] == "test-run" and meta["lora_pipeline.code_commit"] == "test-commit"
    tensors = load_file(path)
    alphas = [t for k, t in tensors.items() if k.endswith(".alpha")]
    ups = [t for k, t in tensors.items() if k.endswith(".lora_up.weight")]
    assert alphas and all(a.item() == 2.0 for a in alphas)
    assert any(u.abs().max() > 0 for u in ups)  # trained away from the zero init

    other, _ = train(root, replace(recipe, seed=43, epochs=1), "c")
    mine, theirs = load_file(first.epochs[0]["file"]), load_file(other.epochs[0]["file"])
    assert any(not torch.equal(t, theirs[k]) for k, t in mine.items() if "lora_" in k)


def _unet_inputs(unet: UNet2DConditionModel, sdxl: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2, 4, 8, 8, generator=gen), "timestep": torch.tensor([100, 700]),
              "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)}
    if sdxl:
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=gen),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return inputs


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_trained_file_loads_in_diffusers_like_the_trained_unet(train_snapshot, tiny_model, family):
    root = train_snapshot(n=4, repeats=2)
    model = "tiny-sdxl" if family == "sdxl" else "tiny-sd"
    recipe = tiny_recipe(base_model=model, model_family=family, epochs=2, optimizer="AdamW", learning_rate=1e-2)
    result, _ = train(root, recipe, "out")
    state = load_state(result.out_dir)
    assert state is not None and state.epoch == 2

    trained = UNet2DConditionModel.from_pretrained(tiny_model(model), subfolder="unet").eval()
    add_unet_lora(trained, recipe.network_dim, recipe.network_alpha)
    with torch.no_grad():
        named = dict(trained.named_parameters())
        for name, tensor in state.lora.items():
            named[name].copy_(tensor)
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = pipeline_class.from_pretrained(tiny_model(model), local_files_only=True)
    inputs = _unet_inputs(pipe.unet, family == "sdxl")
    with torch.no_grad():
        base_out = pipe.unet(**inputs).sample
        pipe.load_lora_weights(result.epochs[-1]["file"], adapter_name="trained")
        pipe.set_adapters(["trained"], [1.0])
        loaded_out = pipe.unet(**inputs).sample
        expected = trained(**inputs).sample
    torch.testing.assert_close(loaded_out, expected, rtol=1e-4, atol=1e-5)
    assert (loaded_out - base_out).abs().max() > 1e-4  # the LoRA does change the output


@pytest.mark.parametrize("optimizer", ["AdamW8bit", "Prodigy"])
def test_resume_restores_optimizer_and_schedule_exactly(train_snapshot, optimizer):
    root = train_snapshot(n=4, repeats=2)
    lr = 1.0 if optimizer == "Prodigy" else 1e-3
    recipe = tiny_recipe(optimizer=optimizer, learning_rate=lr, lr_scheduler="cosine", lr_warmup_steps=2, epochs=2)
    clean, _ = train(root, recipe, "clean")
    with pytest.raises(Crash):
        train(root, recipe, "resumed", log=crash_after(1))
    out = root.root / "resumed"
    (out / "train-v1-tiny-e002.safetensors").write_bytes(b"written after the state: not trusted")
    (out / ".train-v1-tiny-e002.safetensors.x1y2.tmp").write_bytes(b"an interrupted write")
    resumed, lines = train(root, recipe, "resumed")
    assert resumed.resumed_from_epoch == 1 and lines[:2] == [
        "removing .train-v1-tiny-e002.safetensors.x1y2.tmp (not from a resumable run)",
        "removing train-v1-tiny-e002.safetensors (not from a resumable run)",
    ]
    assert lines[2].startswith("resuming train-v1/tiny after epoch 1/2") and lines[3].startswith("epoch 2/2")
    assert not list(out.glob(".*.tmp"))
    assert file_bytes(resumed) == file_bytes(clean)
    assert resumed.loss_history == clean.loss_history and resumed.lr_history == clean.lr_history

    if optimizer == "Prodigy":  # a changed recipe never resumes another recipe's state, and its files go
        changed, lines = train(root, replace(recipe, seed=7, epochs=1), "resumed")
        assert changed.resumed_from_epoch == 0 and any("another recipe" in line for line in lines)
        assert sorted(p.name for p in changed.out_dir.glob("*.safetensors")) == ["train-v1-tiny-e001.safetensors"]


CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from lora_pipeline.core.paths import DataRoot
    from lora_pipeline.core.training.recipe import Recipe
    from lora_pipeline.core.training.run.trainer import train_lora

    root, out, recipe, provenance, started, threads = sys.argv[1:7]
    torch.set_num_threads(int(threads))  # CPU float sums may depend on the thread count; match the parent's
    train_lora(DataRoot(Path(root)), "train-v1", Recipe(**json.loads(recipe)), out_dir=Path(out),
               provenance=json.loads(provenance), started_at=float(started), device="cpu",
               log=lambda line: print(line, flush=True), clock=lambda: float(started) + 60)
    """
)


def test_resume_after_sigkill_gives_the_files_of_an_uninterrupted_run(train_snapshot, tmp_path):
    root = train_snapshot(n=4, repeats=2)
    overrides = {**TINY, "epochs": 3}
    out = root.root / "killed"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    command = [sys.executable, str(script), str(root.root), str(out), json.dumps(overrides), json.dumps(PROVENANCE),
               str(STARTED_AT), str(torch.get_num_threads())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = out / ".resume" / "state.pt"  # epoch 1 saved and vouched for: the kill lands in epoch 2 or later
    deadline = time.monotonic() + 300
    while not first.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    output = child.communicate()[0].decode()
    assert child.returncode == -signal.SIGKILL, output
    assert not (out / "train-v1-tiny-e003.safetensors").exists()

    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "resuming train-v1/tiny after epoch" in finished.stdout

    clean, _ = train(root, Recipe(**overrides), "clean")
    killed_files = {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}
    assert killed_files == file_bytes(clean) and len(killed_files) == 3
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_training_output_inside_sources_or_a_snapshot_is_refused(train_snapshot):
    root = train_snapshot(n=4, repeats=2)
    root.batch("b1").mkdir(parents=True)
    (root.root / "linked").symlink_to(root.dataset("train-v1"))
    before = tree_state(root.root)
    for out, area in [(root.dataset("train-v1") / "out", "datasets"), (root.batch("b1"), "sources"),
                      (root.root / "linked" / "out", "datasets"),
                      (root.loras_root / ".." / "datasets" / "train-v1" / "tiny", "datasets")]:
        with pytest.raises(UserError) as refused:
            train_lora(root, "train-v1", tiny_recipe(), out_dir=out, provenance=PROVENANCE, device="cpu")
        assert str(refused.value) == f"{out}: refusing to write training output inside {area}/ (never written)"
    assert tree_state(root.root) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs (a real full disk) needs root")
def test_a_full_disk_stops_training_in_one_line_with_nothing_half_written(train_snapshot):
    root = train_snapshot(n=4, repeats=2)
    out = root.root / "small-disk"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(out)], check=True)
    try:
        with pytest.raises(UserError) as stopped:  # an epoch file is about 360 kB
            train(root, tiny_recipe(epochs=1), "small-disk")
        first = out / "train-v1-tiny-e001.safetensors"
        assert str(stopped.value) == (f"{first}: No space left on device "
                                      "(training stopped; a rerun resumes after the last saved epoch)")
        assert sorted(p.name for p in out.rglob("*")) == [".lock"]  # no epoch file, no temp file
    finally:
        subprocess.run(["umount", str(out)], check=True)


def test_the_base_model_hash_of_a_fresh_run_is_read_after_the_warm_up_and_lands_in_every_file(train_snapshot,
                                                                                             monkeypatch):
    """A fresh run reads the denoiser's sha256 on a thread started once the shapes are warmed up (beside the
    model's load it slowed the load as much as it hid); the epoch files and the resume state still record it."""
    from lora_pipeline.core.models.model_hash import base_model_hash
    from lora_pipeline.core.training.run import epochs, setup

    events: list[str] = []
    real_warm_up = epochs.warm_up_shapes

    def warm_up(*args, **kwargs):
        events.append("warm-up")
        return real_warm_up(*args, **kwargs)

    def hashed(*args, **kwargs):
        events.append("hash")
        return base_model_hash(*args, **kwargs)

    monkeypatch.setattr(epochs, "warm_up_shapes", warm_up)
    monkeypatch.setattr(setup, "base_model_hash", hashed)
    root = train_snapshot(n=3, repeats=1)
    result, _ = train(root, tiny_recipe(epochs=2, validation_split=0.0), "out")
    assert events == ["warm-up", "hash"]
    expected = base_model_hash(str(root.models / "tiny-sd"))
    for record in result.epochs:
        assert read_lora_metadata(Path(record["file"]))["lora_pipeline.base_model_hash"] == expected
    state = load_state(root.root / "out")
    assert state.key["base_model_hash"] == expected == state.provenance["base_model_hash"]
    events.clear()
    again, _ = train(root, tiny_recipe(epochs=2, validation_split=0.0), "out")  # a finished run: checked up front
    assert events == ["hash", "warm-up"] and again.resumed_from_epoch == 2
