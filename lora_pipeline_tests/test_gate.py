"""The training gate: each reason to refuse, alone, starting from a sealed version that passes."""

from __future__ import annotations

import json

import pytest

from lora_pipeline.core.datasets.checks.gate import require_passed_report
from lora_pipeline.core.datasets.problems import problem
from lora_pipeline.core.datasets.snapshot.manifest import write_manifest
from lora_pipeline.core.datasets.snapshot.seal import seal_snapshot
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import atomic_write_text, read_json, write_json
from lora_pipeline.core.hashing import sha256_file
from lora_pipeline.core.paths import CAPTION_CHECK, CONTACT_SHEET, REPORT_JSON, REPORT_MD, SEAL, SNAPSHOT, DataRoot

VERSION = "gate-v1"
WARNING = problem("img/2_g/a.png", "exact_duplicate", "warning", "identical bytes to b.png", f"dataset:{VERSION}")
ERROR = problem("img/2_g/b.png", "truncated_image", "error", "the file ends early", f"dataset:{VERSION}")


@pytest.fixture
def root(tmp_path) -> DataRoot:
    """A built, captioned, sealed version whose report passed (with a warning, which does not block)."""
    root = DataRoot(tmp_path / "data")
    folder = root.dataset(VERSION)
    folder.mkdir(parents=True)
    manifest_root = write_manifest(folder, [])
    write_json(folder / SNAPSHOT, {"version": VERSION, "manifest_root": manifest_root, "captions_complete": True})
    write_json(folder / CAPTION_CHECK, {"problems": [], "lint": {}, "tag_frequency": {}})
    write_json(folder / REPORT_JSON,
               {"version": VERSION, "manifest_root": manifest_root, "passed": True, "problems": [WARNING]})
    for name in (REPORT_MD, CONTACT_SHEET):
        (folder / name).write_bytes(b"")
    seal_snapshot(folder)
    return root


def tamper(root: DataRoot, name: str, reseal: bool = True, **changes) -> None:
    """Change fields of a JSON file of the version; with `reseal`, the seal records the new bytes, so the
    version is whole and consistent and only the change itself can stop training."""
    folder = root.dataset(VERSION)
    write_json(folder / name, {**read_json(folder / name), **changes})
    if reseal:
        seal = read_json(folder / SEAL)
        seal["files"][name] = sha256_file(folder / name)
        atomic_write_text(folder / SEAL, json.dumps(seal), readonly=True)


def test_a_sealed_passed_current_report_lets_training_start(root):
    assert require_passed_report(root, VERSION).problems == [WARNING]


def test_an_unbuilt_version_is_refused(root):
    (root.dataset(VERSION) / SNAPSHOT).unlink()
    with pytest.raises(UserError, match=f"{VERSION}.yaml: dataset version '{VERSION}' is not built"):
        require_passed_report(root, VERSION)


def test_a_version_without_its_seal_is_refused(root):
    (root.dataset(VERSION) / SEAL).unlink()
    with pytest.raises(UserError, match=f"dataset version '{VERSION}' is not sealed"):
        require_passed_report(root, VERSION)


def test_no_report_is_refused(root):
    (root.dataset(VERSION) / REPORT_JSON).unlink()
    with pytest.raises(UserError, match=f"{REPORT_JSON} changed since the version was sealed; refusing to train"):
        require_passed_report(root, VERSION)


def test_a_report_edited_after_the_seal_is_refused(root):
    tamper(root, REPORT_JSON, reseal=False, problems=[])
    with pytest.raises(UserError, match=f"{REPORT_JSON} changed since the version was sealed; refusing to train"):
        require_passed_report(root, VERSION)


def test_incomplete_captions_are_refused(root):
    tamper(root, SNAPSHOT, captions_complete=False)
    with pytest.raises(UserError, match="captions are not complete"):
        require_passed_report(root, VERSION)


def test_a_stale_report_is_refused(root):
    tamper(root, SNAPSHOT, manifest_root="b" * 64)  # the snapshot moved on since the report was written
    with pytest.raises(UserError, match="validation report is stale"):
        require_passed_report(root, VERSION)


def test_a_report_with_an_error_is_refused(root):
    tamper(root, REPORT_JSON, problems=[WARNING, ERROR])  # `passed` left as it was
    with pytest.raises(UserError, match="refusing to train: .*1 error.*img/2_g/b.png truncated_image"):
        require_passed_report(root, VERSION)


def test_a_report_that_did_not_pass_is_refused(root):
    tamper(root, REPORT_JSON, passed=False)  # no error row, but the report's verdict is failed
    with pytest.raises(UserError, match="refusing to train: .*0 error"):
        require_passed_report(root, VERSION)
