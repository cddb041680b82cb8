"""The `lora-pipeline` console script, run as a user runs it: a subprocess, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_pipeline_tests.test_defs_datasets import tree_state

VERSION = "hardware-design-aesthetic-v1"


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the console script with the test's LORA_PIPELINE_DATA / DAGSTER_HOME."""
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


def test_intake_build_verify(sample_root, tmp_path):
    handoff = tmp_path / "handoff"
    shutil.copytree(sample_root.batch("curated-2026-10"), handoff)
    (handoff / "_READY").unlink()
    (handoff / ".DS_Store").write_bytes(b"junk")
    before = tree_state(handoff)
    out = json.loads(cli("intake", str(handoff), "--batch", "curated-2026-12", "--json").stdout)
    assert out["files"] == 16 and (sample_root.batch("curated-2026-12") / "_READY").is_file()
    assert not (sample_root.batch("curated-2026-12") / ".DS_Store").exists()
    assert tree_state(handoff) == before  # the handoff is only read
    assert_one_line_error(cli("intake", str(handoff), "--batch", "curated-2026-12", check=False), "curated-2026-12")

    built = json.loads(cli("build", VERSION, "--json").stdout)
    assert built["errors"] == 0 and built["counts"]["images"] == 8
    assert Path(built["contact_sheet"]).is_file()

    assert json.loads(cli("verify", "--json").stdout)["ok"] is True
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
    findings = "\n".join(json.loads(result.stdout)["findings"])
    assert f"{image.name}: content changed" in findings
    assert f"{caption.name}: missing" in findings and "stray.png: extra" in findings


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["build", "no-such-version"], ["no-such-version.yaml", "not found"]),
        (["intake", "/no/such/dir", "--batch", "x-1"], ["/no/such/dir"]),
        (["verify", "never-built"], ["never-built", "not built"]),
        (["train", VERSION, "--recipe", "demo-tiny"], [VERSION, "build"]),
        (["provenance", "/no/such.safetensors"], ["/no/such.safetensors"]),
    ],
)
def test_user_errors_are_one_line_exit_1(sample_root, args, needles):
    assert_one_line_error(cli(*args, check=False), *needles)


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
