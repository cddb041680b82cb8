"""Rights per batch: recorded at intake, by `_RIGHTS.yaml` or later by command, as append-only history; carried
into the manifest, the report and contact sheet, a trained LoRA's header and provenance; gated by `allowed_rights`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from lora_pipeline.core.datasets.checks.contact_sheet import RIGHTS_COLOUR
from lora_pipeline.core.datasets.checks.report import read_report
from lora_pipeline.core.datasets.snapshot.manifest import read_manifest, read_snapshot_info
from lora_pipeline.core.datasets.snapshot.snapshot import build_snapshot
from lora_pipeline.core.datasets.sources.batches import intake, scan_batch
from lora_pipeline.core.datasets.sources.rights import (
    batch_rights,
    declaration,
    intake_rights,
    record_rights,
    rights_history,
)
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.lineage.provenance import trace_lora
from lora_pipeline.core.lineage.provenance_text import format_provenance
from lora_pipeline.core.paths import DataRoot
from lora_pipeline.core.training.kohya.lora_file import read_lora_metadata
from lora_pipeline_tests.helpers import captioned_batch, finish_version, tiny_recipe, train, write_spec

OWNED = "rights: owned\nholder: ACME Studio\n"


def _history_file(root: DataRoot, batch: str) -> Path:
    return root.governance / "rights" / f"{batch}.jsonl"


def test_intake_records_the_command_lines_rights_or_the_handoffs_rights_file(tmp_path):
    root = DataRoot(tmp_path / "data")
    handoff = captioned_batch(
        DataRoot(tmp_path / "elsewhere"),
        "handoff",
        [1, 2],
        rights="rights: licensed\nlicense: CC-BY-4.0\nholder: Jane Doe\n",
    )
    declared, digest = intake_rights(handoff, None, None, None)  # the handoff's file, American spelling too
    assert (declared.rights, declared.licence, declared.holder) == ("licensed", "CC-BY-4.0", "Jane Doe")
    intake(handoff, root, "landed")
    record_rights(root, "landed", declared, "intake", file_sha256=digest)
    assert "_RIGHTS.yaml" not in {f.path for f in scan_batch(root, "landed").files}  # never content
    assert not (root.batch("landed") / "_RIGHTS.yaml").exists()  # a record, not a copy
    terms = batch_rights(root, "landed")
    assert (terms.rights, terms.licence, terms.holder, terms.record) == ("licensed", "CC-BY-4.0", "Jane Doe", 1)
    assert rights_history(root, "landed")[0].source == "intake"

    given, _ = intake_rights(handoff, "owned", None, "ACME")  # the command line wins over the file
    assert (given.rights, given.holder) == ("owned", "ACME")
    with pytest.raises(UserError, match="needs a licence"):
        declaration("licensed", None, None)
    with pytest.raises(UserError, match="need --rights"):
        intake_rights(handoff, None, "CC0-1.0", None)
    (handoff / "_RIGHTS.yaml").write_text("rights: borrowed\n")
    with pytest.raises(UserError, match=r"_RIGHTS.yaml: rights: expected one of") as bad:
        intake_rights(handoff, None, None, None)
    assert "\n" not in str(bad.value)


def test_a_rights_file_is_recorded_once_and_a_change_is_a_new_record(tmp_path):
    root = DataRoot(tmp_path / "data")
    folder = captioned_batch(root, "by-sensor", [1], rights=OWNED)
    assert batch_rights(root, "nothing-here").rights == "unknown"  # no folder, no record
    assert batch_rights(root, "by-sensor").rights == "owned"
    assert batch_rights(root, "by-sensor").record == 1  # asked again: the same bytes are not recorded twice
    first_line = _history_file(root, "by-sensor").read_bytes()
    (folder / "_RIGHTS.yaml").write_text("rights: public-domain\n")
    assert batch_rights(root, "by-sensor").rights == "public-domain"
    record_rights(
        root,
        "by-sensor",
        declaration("licensed", "https://example.com/licence", None),
        "command",
        reason="bought a licence",
    )
    history = rights_history(root, "by-sensor")
    assert [(r.rights, r.source) for r in history] == [
        ("owned", "_RIGHTS.yaml"),
        ("public-domain", "_RIGHTS.yaml"),
        ("licensed", "command"),
    ]
    assert _history_file(root, "by-sensor").read_bytes().startswith(first_line)  # history is never rewritten
    assert batch_rights(root, "by-sensor").label == "licensed (https://example.com/licence)"
    linked = captioned_batch(root, "linked", [2])
    (linked / "_RIGHTS.yaml").symlink_to(folder / "_RIGHTS.yaml")  # nothing under a batch is read through a link
    with pytest.raises(UserError, match="symbolic link, not followed"):
        batch_rights(root, "linked")


def _two_batch_version(root: DataRoot, name: str = "rights-v1", **fields):
    captioned_batch(root, "owned-batch", [1, 2], rights=OWNED)
    captioned_batch(root, "anon-batch", [3, 4])
    spec = write_spec(root, name, [{"batch": "owned-batch"}, {"batch": "anon-batch"}], **fields)
    build_snapshot(root, spec, "test")
    finish_version(root, spec)
    return root.dataset(name)


def test_rights_travel_into_the_manifest_the_report_and_the_contact_sheet(tmp_path):
    root = DataRoot(tmp_path / "data")
    folder = _two_batch_version(root)
    images = {r.source_batch: r.rights for r in read_manifest(folder) if r.kind == "image"}
    assert images == {"owned-batch": "owned", "anon-batch": None}  # no record: unknown, as before rights
    assert read_snapshot_info(folder).rights["owned-batch"].holder == "ACME Studio"
    report = read_report(folder)
    assert report.passed and report.counts["by_rights"] == {"owned": 2, "unknown": 2}
    assert report.rights_by_batch == {"owned-batch": {"rights": "owned", "holder": "ACME Studio", "record": 1}}
    markdown = (folder / "report.md").read_text()
    assert "## Rights" in markdown and "| owned-batch | owned |  | ACME Studio | 1 |" in markdown
    assert "2 images have unknown rights" in markdown
    sheet = Image.open(folder / "contact_sheet.png").convert("RGB")
    assert RIGHTS_COLOUR in {colour for _, colour in sheet.getcolors(1 << 20)}  # the unknown images' badge

    manifest_before = (folder / "manifest.jsonl").read_bytes()
    record_rights(root, "anon-batch", declaration("public-domain", None, None), "command")
    assert (folder / "manifest.jsonl").read_bytes() == manifest_before  # a built version keeps its rights
    spec = write_spec(root, "rights-v2", [{"batch": "owned-batch"}, {"batch": "anon-batch"}])
    build_snapshot(root, spec, "test")
    finish_version(root, spec)
    assert read_report(root.dataset("rights-v2")).counts["by_rights"] == {"owned": 2, "public-domain": 2}


def test_allowed_rights_blocks_a_version_with_an_unknown_batch_and_passes_without_it(tmp_path):
    root = DataRoot(tmp_path / "data")
    allowed = ["owned", "licensed", "public-domain"]
    folder = _two_batch_version(root, "gated-v1", allowed_rights=allowed)
    report = read_report(folder)
    blocked = [p for p in report.problems if p["code"] == "rights_not_allowed"]
    assert not report.passed and all(p["severity"] == "error" for p in blocked)
    assert sorted(p["file"] for p in blocked) == ["img/2_trg/anon-batch-3.png", "img/2_trg/anon-batch-4.png"]
    assert "rights 'unknown' (batch anon-batch)" in blocked[0]["message"]

    spec = write_spec(root, "gated-v2", [{"batch": "owned-batch"}], allowed_rights=allowed)
    build_snapshot(root, spec, "test")
    finish_version(root, spec)
    assert read_report(root.dataset("gated-v2")).passed
    unset = write_spec(root, "gated-v3", [{"batch": "owned-batch"}])
    assert unset.sha256 == write_spec(root, "gated-v3", [{"batch": "owned-batch"}], allowed_rights=[]).sha256


def test_a_trained_lora_and_its_provenance_carry_the_rights_and_say_when_they_changed(tmp_path, tiny_model):
    root = DataRoot(tmp_path / "data")
    _two_batch_version(root)
    root.models.mkdir()
    os.symlink(tiny_model("tiny-sd"), root.models / "tiny-sd")
    result, _ = train(root, tiny_recipe(epochs=1, validation_split=0.0), "out", version="rights-v1")
    lora = Path(result.epochs[-1]["file"])
    meta = read_lora_metadata(lora)
    assert json.loads(meta["ss_dataset_rights"]) == {"owned": 2, "unknown": 2}
    assert meta["modelspec.license"] == "owned (holder ACME Studio); unknown"
    assert json.loads(meta["lora_pipeline.rights"]) == {
        "anon-batch": {"rights": "unknown", "images": 2},
        "owned-batch": {"rights": "owned", "holder": "ACME Studio", "record": 1, "images": 2},
    }

    chain = trace_lora(root, lora)
    assert [(b.batch, b.rights_at_build.rights, b.rights_changed_at) for b in chain.batches] == [
        ("anon-batch", "unknown", None),
        ("owned-batch", "owned", None),
    ]
    record_rights(root, "owned-batch", declaration("unknown", None, None), "command", reason="holder withdrew")
    later = trace_lora(root, lora)
    owned = later.batches[1]
    assert owned.rights_at_build.rights == "owned" and owned.rights_now.rights == "unknown"
    assert owned.rights_changed_at is not None
    assert "rights changed after the version was built: now unknown" in format_provenance(later)
    assert later["batches"][1]["rights_at_build"]["rights"] == "owned"  # in --json too
