"""The base-model hash cache (core/models/model_hash_cache.py) on real files: a second hash of an unchanged file reads
nothing (in this process or a new one), a changed file is read again, an edited or damaged entry is never trusted,
two processes writing at once leave a whole cache, and provenance still finds a base model that changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_pipeline.core.hashing import sha256_file, sha256_stream
from lora_pipeline.core.lineage.provenance import KEY, trace_lora
from lora_pipeline.core.models import model_hash_cache
from lora_pipeline.core.models.model_hash import base_model_hash
from lora_pipeline.core.models.model_hash_cache import FOLDER, file_sha256
from lora_pipeline.core.training.kohya.lora_file import read_lora_metadata
from lora_pipeline_tests.helpers import tiny_recipe, train
from lora_pipeline_tests.test_provenance import traced  # noqa: F401  (the fixture)

MB = 1 << 20
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def reads(monkeypatch):
    """The (path, bytes) of every file the cache hashes from here on; entries may be recorded at once (no racy
    window: the files of these tests are only just written)."""
    seen: list[tuple[str, int]] = []

    def counting(f, chunk_size):
        sha, n = sha256_stream(f, chunk_size)
        seen.append((os.readlink(f"/proc/self/fd/{f.fileno()}"), n))
        return sha, n

    monkeypatch.setattr(model_hash_cache, "sha256_stream", counting)
    monkeypatch.setattr(model_hash_cache, "RACY_NS", 0)
    return seen


def _weights(path: Path, size: int = 8 * MB, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(hashlib.sha256(str(seed).encode()).digest() * (size // 32))
    return path


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / FOLDER).glob("*.json"))


def _rewrite_same_size(path: Path, forge_mtime_back: bool) -> None:
    """Flip one byte in the middle, in place (same inode, same size); the mtime moves on, or is forged back."""
    old = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    time.sleep(0.01)
    with open(path, "r+b") as f:
        f.write(data)
    if forge_mtime_back:
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    new = path.stat()
    assert new.st_size == old.st_size and new.st_ino == old.st_ino
    assert (new.st_mtime_ns == old.st_mtime_ns) == forge_mtime_back


def test_a_second_hash_of_an_unchanged_file_reads_nothing(tmp_path, reads):
    weights, cache = _weights(tmp_path / "unet/w.safetensors"), tmp_path / "data/.cache"
    first = file_sha256(weights, cache)
    assert first == sha256_file(weights) and reads == [(str(weights), 8 * MB)]
    started = time.perf_counter()
    assert file_sha256(weights, cache) == first
    assert reads == [(str(weights), 8 * MB)] and time.perf_counter() - started < 0.05
    assert file_sha256(weights, None) == first and len(reads) == 2  # no cache folder given: always hashed


def test_a_new_process_hashes_nothing_the_first_one_hashed(tmp_path, reads):
    weights, cache = _weights(tmp_path / "w.bin"), tmp_path / "data/.cache"
    sha = file_sha256(weights, cache)
    script = ("import sys; from pathlib import Path; from lora_pipeline.core.models import model_hash_cache as m\n"
              "n = []; real = m.sha256_stream\n"
              "m.sha256_stream = lambda f: n.append(1) or real(f)\n"
              "print(m.file_sha256(Path(sys.argv[1]), Path(sys.argv[2])), len(n))\n")
    out = subprocess.run([sys.executable, "-c", script, str(weights), str(cache)], capture_output=True, text=True,
                         check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.split() == [sha, "0"]


@pytest.mark.parametrize("forge_mtime_back", [False, True])
def test_a_changed_file_is_hashed_again_even_at_its_old_size_and_mtime(tmp_path, reads, forge_mtime_back):
    weights, cache = _weights(tmp_path / "w.safetensors"), tmp_path / ".cache"
    old = file_sha256(weights, cache)
    _rewrite_same_size(weights, forge_mtime_back)
    new = file_sha256(weights, cache)
    assert new != old and new == sha256_file(weights) and len(reads) == 2
    assert file_sha256(weights, cache) == new and len(reads) == 2  # the new version is what is cached now


def test_an_edited_or_damaged_entry_is_detected_and_the_file_hashed_again(tmp_path, reads):
    weights, cache = _weights(tmp_path / "w.safetensors"), tmp_path / ".cache"
    sha = file_sha256(weights, cache)
    [entry] = _entries(cache)
    row = json.loads(entry.read_text())
    forged = {**row, "sha256": "0" * 64}
    entry.write_text(json.dumps(forged))  # the sha256 edited, its check left as it was
    assert file_sha256(weights, cache) == sha and len(reads) == 2
    assert json.loads(entry.read_text()) == row  # replaced by a true entry, which is trusted again
    assert file_sha256(weights, cache) == sha and len(reads) == 2

    body = json.dumps({k: v for k, v in forged.items() if k != "check"}, sort_keys=True, separators=(",", ":"))
    entry.write_text(json.dumps(forged | {"check": hashlib.sha256(body.encode()).hexdigest()}))  # no key: no HMAC
    assert file_sha256(weights, cache) == sha and len(reads) == 3
    for damage in ("{not json", "[]", json.dumps({"check": row["check"]}), ""):
        entry.write_text(damage)
        assert file_sha256(weights, cache) == sha
    assert len(reads) == 7
    entry.unlink()
    entry.symlink_to(tmp_path / "elsewhere.json")  # an entry that is a link is not followed, and is replaced
    (tmp_path / "elsewhere.json").write_text(json.dumps(row))
    assert file_sha256(weights, cache) == sha and len(reads) == 8 and not entry.is_symlink()


def test_an_entry_of_another_file_or_a_key_others_can_read_is_not_trusted(tmp_path, reads):
    a, b, cache = _weights(tmp_path / "a.bin"), _weights(tmp_path / "b.bin", seed=1), tmp_path / ".cache"
    sha_a, sha_b = file_sha256(a, cache), file_sha256(b, cache)
    entry_a, entry_b = (cache / FOLDER / f"{hashlib.sha256(str(p).encode()).hexdigest()}.json" for p in (a, b))
    shutil.copyfile(entry_b, entry_a)  # b's true entry (a valid check) under a's name: it names b
    assert file_sha256(a, cache) == sha_a and len(reads) == 3
    (cache / FOLDER / ".key").chmod(0o644)
    assert file_sha256(b, cache) == sha_b and file_sha256(b, cache) == sha_b and len(reads) == 5


def test_links_to_a_file_share_its_entry(tmp_path, reads):
    weights, cache = _weights(tmp_path / "models/real/w.bin"), tmp_path / ".cache"
    (tmp_path / "linked").symlink_to(tmp_path / "models/real")
    assert file_sha256(tmp_path / "linked/w.bin", cache) == file_sha256(weights, cache) and len(reads) == 1


def test_a_file_written_just_now_is_not_recorded(tmp_path, reads, monkeypatch):
    monkeypatch.setattr(model_hash_cache, "RACY_NS", 60_000_000_000)
    weights, cache = _weights(tmp_path / "w.bin"), tmp_path / ".cache"
    assert file_sha256(weights, cache) == file_sha256(weights, cache) and len(reads) == 2 and not _entries(cache)


WRITER = """
import os, random, sys
from pathlib import Path
from lora_pipeline.core.models import model_hash_cache as m
m.RACY_NS = 0
cache, files, expected = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:-1]], sys.argv[-1].split(",")
for round in range(40):
    for entry in (cache / m.FOLDER).glob("*.json"):
        if random.random() < 0.5:
            entry.unlink(missing_ok=True)  # so that both processes keep writing entries
    for path, sha in zip(files, expected):
        assert m.file_sha256(path, cache) == sha, path
"""


def test_two_processes_writing_at_once_leave_a_whole_cache(tmp_path, reads):
    files = [_weights(tmp_path / f"w{i}.bin", MB, seed=i) for i in range(6)]
    cache, expected = tmp_path / ".cache", [sha256_file(f) for f in files]
    args = [sys.executable, "-c", WRITER, str(cache), *map(str, files), ",".join(expected)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [subprocess.Popen(args, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for writer in writers:
        assert writer.wait(timeout=120) == 0, writer.stderr.read()
    assert [file_sha256(f, cache) for f in files] == expected
    assert [p.name for p in (cache / FOLDER).iterdir() if p.name.startswith(".")] == [".key"]  # no temp file left
    for entry in _entries(cache):
        assert json.loads(entry.read_text())["sha256"] in expected
    before = len(reads)
    assert [file_sha256(f, cache) for f in files] == expected and len(reads) == before


def _model_copy(root, tiny_model) -> Path:
    """A private copy of tiny-sd under the data root's models/ (the shared tiny model is never changed)."""
    copy = root.models / "tiny-sd-copy"
    shutil.copytree(tiny_model("tiny-sd"), copy)
    return copy


@pytest.mark.parametrize("forge_mtime_back", [False, True])
def test_provenance_hashes_the_base_model_once_and_still_finds_it_changed(traced, tiny_model, reads,  # noqa: F811
                                                                          forge_mtime_back):
    root, save = traced
    model = _model_copy(root, tiny_model)
    lora = save(base_model_source=str(model), base_model_hash=base_model_hash(str(model), cache=root.cache))
    unet = model / "unet/diffusion_pytorch_model.safetensors"

    def copy_reads() -> list[str]:  # (the fixture's own header hashes the shared tiny model too)
        return [path for path, _ in reads if path.startswith(str(model))]

    assert copy_reads() == [str(unet)]
    assert trace_lora(root, lora)["base_model"]["status"] == "unchanged"
    assert trace_lora(root, lora)["status"] == "ok" and copy_reads() == [str(unet)]  # served from the cache twice

    _rewrite_same_size(unet, forge_mtime_back)
    chain = trace_lora(root, lora)
    assert chain["base_model"]["status"] == "changed" and copy_reads() == [str(unet)] * 2
    assert chain["status"] == [f"base model {model} changed since training (its U-Net hash differs)"]


def test_a_training_run_and_its_provenance_check_read_each_base_model_file_once(train_snapshot, reads):
    root = train_snapshot()
    recipe = tiny_recipe(epochs=1, validation_split=0.0, cache_latents=True, cache_latents_to_disk=True,
                         cache_text_encoder_outputs_to_disk=True, network_train_unet_only=True,
                         shuffle_caption=False)
    result, _ = train(root, recipe, "out")
    meta = read_lora_metadata(sorted(result.out_dir.glob("*.safetensors"))[-1])
    source = meta[f"{KEY}base_model_source"]  # provenance's check (traced above, on a hand-built chain)
    assert base_model_hash(source, cache=root.cache) == meta[f"{KEY}base_model_hash"]
    paths = [path for path, _ in reads]
    model = Path(os.path.realpath(root.models / "tiny-sd"))
    assert str(model / "unet/diffusion_pytorch_model.safetensors") in paths
    assert str(model / "vae/diffusion_pytorch_model.safetensors") in paths
    assert any(p.startswith(str(model / "text_encoder")) for p in paths)
    assert sorted(paths) == sorted(set(paths))  # the trainer, its caches and provenance: each file read once
    train(root, recipe, "again")
    assert len(reads) == len(paths)  # a second run reads none of them
