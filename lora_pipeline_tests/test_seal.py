"""A dataset version is whole only when sealed: a build killed after the rename is never treated as whole by
a reader, `verify` or the training gate, building again completes it, and the seal covers the report files."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import dagster as dg
import pytest

from lora_pipeline import cli as lora_cli
from lora_pipeline.core.datasets.checks.gate import require_passed_report
from lora_pipeline.core.datasets.snapshot.seal import read_seal, seal_snapshot
from lora_pipeline.core.errors import UserError
from lora_pipeline.runs.instance import definitions
from lora_pipeline_tests.helpers import assert_one_line_error, cli

VERSION = "hardware-design-aesthetic-v1"
DERIVED = "hardware-design-aesthetic-v7"  # a later version built from VERSION

# The build's steps run in a subprocess that SIGKILLs itself right after the given step: the state a
# `kill -9` of `lora-pipeline build` leaves at that moment (the rename of the images is the first step).
KILLED_BUILD = """
import os, signal, sys
from lora_pipeline.core.datasets.captions.captions import plan_captions, write_captions
from lora_pipeline.core.datasets.snapshot.snapshot import build_snapshot
from lora_pipeline.core.datasets.spec import load_spec
from lora_pipeline.core.paths import DataRoot
root = DataRoot.from_env()
spec = load_spec(root.spec_file(sys.argv[1]))
build_snapshot(root, spec, "code")
if sys.argv[2] == "captions":  # caption files written, the manifest not yet: verify would see "extra" files
    write_captions(root.dataset(spec.name), plan_captions(root, spec, root.dataset(spec.name)))
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture
def main(capsys):
    """`main(*args)`: the command line in this process (cheaper than a subprocess): (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()  # only this command's output
        code = lora_cli.main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def one_line(result: tuple[int, str, str], *needles: str) -> None:
    code, _, err = result
    assert code == 1 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert all(needle in err for needle in needles), err


@pytest.mark.parametrize("killed_after", ["snapshot", "captions"])
def test_a_build_killed_after_the_rename_is_never_whole_and_building_again_completes_it(
    sample_root, main, killed_after
):
    killed = subprocess.run([sys.executable, "-c", KILLED_BUILD, VERSION, killed_after], timeout=300)
    assert killed.returncode == -signal.SIGKILL
    snapshot_dir = sample_root.dataset(VERSION)
    assert (snapshot_dir / "snapshot.json").is_file() and read_seal(snapshot_dir) is None
    assert len(list(snapshot_dir.glob("img/*/*.txt"))) == (8 if killed_after == "captions" else 0)

    # verify: named alone it fails with "not sealed", never a false "extra file" or root mismatch
    code, stdout, _ = main("verify", VERSION, "--json")
    assert code == 1
    out = json.loads(stdout)
    assert out["findings"] == [] and out["ok"] is False
    assert out["unsealed"] == [f"{VERSION}: not sealed yet (being built, or its build was interrupted, or its seal "
                               f"was removed: run `lora-pipeline build {VERSION}`); not verified"]
    code, stdout, _ = main("verify", "--json")
    assert code == 1  # verifying everything (as the nightly schedule does): a version without a seal is not ok
    everything = json.loads(stdout)
    assert everything["versions"][VERSION] == {"ok": False, "sealed": False, "files_checked": 0}
    nightly = definitions().resolve_job_def("verify_snapshots_job")
    ran = nightly.execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not ran.success
    # the gate
    one_line(main("train", VERSION, "--recipe", "demo-tiny"), VERSION, "not sealed")
    with pytest.raises(UserError, match="is not sealed"):
        require_passed_report(sample_root, VERSION)
    # a reader: another version built from it
    spec = sample_root.spec_file(VERSION).read_text().replace(f"name: {VERSION}", f"name: {DERIVED}")
    spec = spec.replace("  - batch: curated-2026-10", f"  - dataset: {VERSION}")
    sample_root.spec_file(DERIVED).write_text(spec)
    one_line(main("build", DERIVED), f"source dataset '{VERSION}' is not sealed")
    assert not sample_root.dataset(DERIVED).exists()

    code, stdout, _ = main("build", VERSION, "--json")
    assert code == 0 and json.loads(stdout)["errors"] == 0 and read_seal(snapshot_dir) is not None
    code, stdout, _ = main("verify", VERSION, "--json")
    assert code == 0 and json.loads(stdout)["ok"] is True
    assert require_passed_report(sample_root, VERSION).passed is True
    code, stdout, _ = main("build", DERIVED, "--json")
    assert code == 0 and json.loads(stdout)["errors"] == 0  # no longer refused


def test_edited_report_files_are_caught_by_verify_and_the_gate(sample_root, main):
    batch = sample_root.batch("curated-2026-10")
    (batch / "cur-01-sage.txt").chmod(0o644)
    (batch / "cur-01-sage.txt").write_text("hdaesth, sage green body, product shot\n")  # a banned word: fails
    one_line(main("build", VERSION), "blocking problem")
    snapshot_dir = sample_root.dataset(VERSION)
    report_path = snapshot_dir / "report.json"
    report = json.loads(report_path.read_text())
    assert report["passed"] is False
    report.update(passed=True, problems=[])  # "passed"
    report_path.chmod(0o644)
    report_path.write_text(json.dumps(report))

    assert_one_line_error(cli("train", VERSION, "--recipe", "demo-tiny", check=False),
                          "report.json changed since the version was sealed", "refusing to train")
    for name in ("report.md", "contact_sheet.png"):
        (snapshot_dir / name).chmod(0o644)
        with open(snapshot_dir / name, "ab") as f:
            f.write(b"\n")
    code, stdout, _ = main("verify", VERSION, "--json")
    assert code == 1
    # (the lineage index, derived from the report, differs too: verify names it as well)
    assert sorted(f for f in json.loads(stdout)["findings"] if f.startswith(f"{VERSION}/")) == [
        f"{VERSION}/{name}: content changed (sha256 differs from seal)"
        for name in ("contact_sheet.png", "report.json", "report.md")
    ]


def test_sealing_refuses_files_the_manifest_does_not_list_and_removes_interrupted_temp_files(sample_root, main):
    assert main("build", VERSION)[0] == 0
    snapshot_dir = sample_root.dataset(VERSION)
    seal = read_seal(snapshot_dir)
    folder = next(snapshot_dir.glob("img/*"))
    leftover = folder / ".cur-01-sage.txt.k2j3h4.tmp"  # an atomic write killed before its rename
    leftover.write_text("half")
    assert seal_snapshot(snapshot_dir) == seal and not leftover.exists()
    (folder / "stray.png").write_bytes(b"not listed")
    with pytest.raises(UserError, match="is not listed in the manifest"):
        seal_snapshot(snapshot_dir)
