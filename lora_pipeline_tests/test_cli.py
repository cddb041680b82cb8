"""The `lora-pipeline` console script, run as a user runs it: a subprocess, exit codes, one-line errors."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from lora_pipeline.core.datasets.snapshot.manifest import SEALED_FILES
from lora_pipeline.runs.instance import instance
from lora_pipeline_tests.helpers import assert_one_line_error, cli, tree_state

VERSION = "hardware-design-aesthetic-v1"


def test_intake_build_verify(sample_root, tmp_path):
    handoff = tmp_path / "handoff"
    shutil.copytree(sample_root.batch("curated-2026-10"), handoff)
    (handoff / "_READY").unlink()
    (handoff / ".DS_Store").write_bytes(b"junk")
    before = tree_state(handoff)
    out = json.loads(cli("intake", str(handoff), "--batch", "curated-2026-12", "--json").stdout)
    assert out["files"] == 16 and (sample_root.batch("curated-2026-12") / "_READY").is_file()
    marker = json.loads((sample_root.batch("curated-2026-12") / "_READY").read_text())
    assert out["batch_fingerprint"] == marker["fingerprint"]  # the batch fingerprint (README: two fingerprints)
    assert not (sample_root.batch("curated-2026-12") / ".DS_Store").exists()
    assert tree_state(handoff) == before  # the handoff is only read
    assert_one_line_error(cli("intake", str(handoff), "--batch", "curated-2026-12", check=False), "curated-2026-12")

    built = json.loads(cli("build", VERSION, "--json").stdout)
    assert built["errors"] == 0 and built["counts"]["images"] == 8
    assert Path(built["contact_sheet"]).is_file()
    # the batch the spec takes is fingerprinted (source_batch materialized), as the sensor does under `make ui`
    materialized = instance().get_materialized_partitions(dg.AssetKey("source_batch"))
    assert materialized == {"curated-2026-10", "curated-2026-12"}

    verified = json.loads(cli("verify", "--json").stdout)
    assert verified["ok"] is True and verified["versions"][VERSION]["files_checked"] == 16 + len(SEALED_FILES)
    run = instance().get_run_by_id(verified["dagster_run_id"])  # the nightly schedule's job
    assert run.job_name == "verify_snapshots_job" and run.is_success
    image = next(Path(built["dataset"]).glob("img/*/*.png"))
    image.chmod(0o644)
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF
    image.write_bytes(bytes(data))
    extra = image.with_name("stray.png")
    extra.write_bytes(b"not in the manifest")
    caption = next(Path(built["dataset"]).glob("img/*/*.txt"))
    caption.unlink()
    result = cli("verify", VERSION, "--json", check=False)
    assert result.returncode == 1
    failed = json.loads(result.stdout)
    assert not instance().get_run_by_id(failed["dagster_run_id"]).is_success
    findings = "\n".join(failed["findings"])
    assert f"{image.name}: content changed" in findings
    assert f"{caption.name}: missing" in findings and "stray.png: extra" in findings


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["build", "hardware-design-aesthetc-v1"],  # a typo: the closest existing versions are named
         ["hardware-design-aesthetc-v1.yaml", "not found", "closest: hardware-design-aesthetic-v1"]),
        (["intake", "/no/such/dir", "--batch", "x-1"], ["/no/such/dir"]),
        (["verify", "never-built"], ["never-built", "not built"]),
        (["evaluate", VERSION, "--recipe", "demo-tny"], ["demo-tny.yaml", "closest: demo-tiny"]),
        (["train", VERSION, "--recipe", "demo-tiny"], [VERSION, "build"]),
        (["provenance", "/no/such.safetensors"], ["/no/such.safetensors"]),
    ],
)
def test_user_errors_are_one_line_exit_1(sample_root, args, needles):
    assert_one_line_error(cli(*args, check=False), *needles)


def test_verify_on_an_empty_data_root_says_it_checked_nothing_and_text_output_uses_json_literals(
    sample_root, capsys
):
    from lora_pipeline import cli as cli_module

    assert cli_module.main(["verify"]) == 0
    expected = f"nothing to verify: no dataset version is built under {sample_root.datasets}"
    assert capsys.readouterr().out.strip() == expected
    assert cli_module._key_value_lines({"ok": True, "x": None, "n": 2}) == "ok: true\nx: null\nn: 2"


def test_bad_spec_and_blocking_problems(sample_root):
    bad = sample_root.spec_file("broken-v1")
    bad.write_text("name: broken-v1\ntrigger: x\nrepeats: [\n")
    assert_one_line_error(cli("build", "broken-v1", check=False), "broken-v1.yaml", "invalid YAML")
    # a caption with a banned word and a zero-byte image: the build reports them and exits 1
    batch = sample_root.batch("curated-2026-10")
    for path in batch.iterdir():
        path.chmod(0o644)
    (batch / "cur-01-sage.txt").write_text("hdaesth, sage green body, product shot\n")
    (batch / "zero.png").write_bytes(b"")
    (batch / "zero.txt").write_text("hdaesth, front view\n")
    result = cli("build", VERSION, check=False)
    assert_one_line_error(result, "blocking problem")
    report = json.loads((sample_root.dataset(VERSION) / "report.json").read_text())
    codes = {(p["code"], p["severity"]) for p in report["problems"]}
    assert ("banned_word", "error") in codes and ("zero_byte", "error") in codes
    assert_one_line_error(cli("train", VERSION, "--recipe", "demo-tiny", check=False), "refusing to train")


# --- operating-system errors and interrupts (helper fsa): one line, nothing half under a final name ----------
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small or read-only filesystem needs root")


@contextlib.contextmanager
def _mounted(path: Path, *mounts: list[str]):
    """Run `mount` with each argument list on `path` (a tmpfs; a bind, then its read-only remount), and unmount
    the one filesystem they made afterwards."""
    for args in mounts:
        subprocess.run(["mount", *args, str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _read_only(path: Path):
    return _mounted(path, ["--bind", str(path)], ["-o", "remount,bind,ro"])


def _noise_batch(root, batch: str, version: str, files: int, megabytes: float) -> None:
    """A ready batch of `files` incompressible PNGs of about `megabytes` each, captioned, and a spec for it."""
    import numpy as np
    from PIL import Image

    side = int((megabytes * 1e6 / 3) ** 0.5)
    rng = np.random.default_rng(7)
    top = root.batch(batch)
    top.mkdir(parents=True)
    for i in range(files):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(top / f"n{i:03d}.png",
                                                                                    compress_level=0)
        (top / f"n{i:03d}.txt").write_text("noisy, front view\n")
    (top / "_READY").write_text("")
    root.spec_file(version).write_text(
        f"name: {version}\ntrigger: noisy\nrepeats: 1\nsources:\n  - batch: {batch}\ncaptions:\n  from: sidecar\n"
        "checks:\n  min_side: 64\n  near_duplicates: ignore\n"
    )


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


@needs_root
def test_a_full_disk_during_copy_or_report_is_one_line_and_leaves_nothing_half(sample_root, tmp_path):
    _noise_batch(sample_root, "noise", "noise-v1", files=3, megabytes=1.0)
    sample_root.datasets.mkdir()
    with _mounted(sample_root.datasets, ["-t", "tmpfs", "-o", "size=2m", "tmpfs"]):
        assert_one_line_error(cli("build", "noise-v1", check=False), "No space left on device", "n00")
        assert not (sample_root.dataset("noise-v1")).exists() and _hidden(sample_root.datasets) == []

        # the images and captions fit; then the disk fills up and the report cannot be written
        from lora_pipeline.core.datasets.captions.captions import plan_captions, write_captions
        from lora_pipeline.core.datasets.snapshot.manifest import record_captions
        from lora_pipeline.core.datasets.snapshot.snapshot import build_snapshot
        from lora_pipeline.core.datasets.spec import load_spec

        spec = load_spec(sample_root.spec_file(VERSION))
        snapshot_dir = build_snapshot(sample_root, spec, "code").dir
        record_captions(snapshot_dir, write_captions(snapshot_dir, plan_captions(sample_root, spec, snapshot_dir)))
        filler = sample_root.datasets / "filler"
        with open(filler, "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        assert_one_line_error(cli("build", VERSION, check=False), "No space left on device", VERSION)
        names = sorted(p.relative_to(snapshot_dir).as_posix() for p in snapshot_dir.rglob("*") if p.is_file())
        assert not [n for n in names if n.endswith(".tmp") or n in ("report.json", "report.md", "seal.json")]
        assert_one_line_error(cli("train", VERSION, "--recipe", "demo-tiny", check=False), "not sealed")
        filler.unlink()
        assert json.loads(cli("build", VERSION, "--json").stdout)["errors"] == 0
        assert (snapshot_dir / "seal.json").is_file()

    handoff = tmp_path / "handoff"  # an intake onto a full sources/ folder
    shutil.move(sample_root.batch("noise"), handoff)
    with _mounted(sample_root.sources, ["-t", "tmpfs", "-o", "size=2m", "tmpfs"]):
        assert_one_line_error(cli("intake", str(handoff), "--batch", "noise-2", check=False), "No space left")
        assert os.listdir(sample_root.sources) == []


@needs_root
def test_a_read_only_data_root_or_sources_folder_is_one_line(sample_root, tmp_path):
    handoff = tmp_path / "handoff"
    handoff.mkdir()
    (handoff / "a.txt").write_text("hdaesth, front view\n")
    with _read_only(sample_root.root):
        assert_one_line_error(cli("build", VERSION, check=False), "Read-only file system")
        assert_one_line_error(cli("intake", str(handoff), "--batch", "new-batch", check=False),
                              "Read-only file system")
    assert not sample_root.datasets.exists() and not sample_root.batch("new-batch").exists()
    with _read_only(sample_root.sources):  # sources are only read: a build works, an intake cannot land
        assert json.loads(cli("build", VERSION, "--json").stdout)["errors"] == 0
        assert_one_line_error(cli("intake", str(handoff), "--batch", "new-batch", check=False),
                              "Read-only file system")
    assert not sample_root.batch("new-batch").exists() and _hidden(sample_root.sources) == []


@pytest.mark.parametrize(
    ("command", "signum"), [("build", signal.SIGINT), ("build", signal.SIGTERM), ("intake", signal.SIGTERM)]
)
def test_ctrl_c_or_sigterm_while_copying_is_one_line_and_removes_the_staging_folder(
    sample_root, tmp_path, command, signum
):
    _noise_batch(sample_root, "noise", "noise-v1", files=24, megabytes=3.0)
    if command == "intake":
        shutil.move(sample_root.batch("noise"), tmp_path / "handoff")
        args = ["intake", str(tmp_path / "handoff"), "--batch", "noise-2"]
        parent, final = sample_root.sources, "noise-2"
    else:
        args, parent, final = ["build", "noise-v1"], sample_root.datasets, "noise-v1"
    exe = Path(sys.executable).with_name("lora-pipeline")
    proc = subprocess.Popen([str(exe), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    deadline = time.monotonic() + 120
    while not (parent.is_dir() and _hidden(parent)):  # copying into a staging folder
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["error: interrupted (Ctrl-C or SIGTERM); run the command again to finish"]
    assert _hidden(parent) == [] and not os.path.lexists(parent / final)


def test_names_that_are_not_utf8_are_problems_at_intake_and_build(sample_root, tmp_path):
    handoff = tmp_path / "handoff"
    shutil.copytree(sample_root.batch("curated-2026-10"), handoff)
    (handoff / "_READY").unlink()
    bad = os.fsdecode(b"caf\xe9-01.png")  # Latin-1 bytes in a file name
    shutil.copyfile(handoff / "cur-01-sage.png", handoff / bad)
    assert "xe9-01.png" in cli("intake", str(handoff), "--batch", "latin-1").stdout  # printed, no traceback
    skipped = json.loads(cli("intake", str(handoff), "--batch", "latin-2", "--json").stdout)["skipped"]
    assert [(p["file"], p["code"]) for p in skipped] == [("caf\\xe9-01.png", "undecodable_name")]
    assert {"latin-1", "latin-2"} <= set(sample_root.ready_batches())  # complete: nothing blocks a retry
    assert not os.path.lexists(sample_root.batch("latin-1") / bad)

    shutil.copyfile(handoff / bad, sample_root.batch("curated-2026-10") / bad)  # put into sources/ by hand
    built = cli("build", VERSION, "--json")
    assert json.loads(built.stdout)["errors"] == 0 and not built.stderr
    report = json.loads((sample_root.dataset(VERSION) / "report.json").read_text())
    assert [(p["file"], p["severity"]) for p in report["problems"] if p["code"] == "undecodable_name"] == [
        ("caf\\xe9-01.png", "warning")
    ]
