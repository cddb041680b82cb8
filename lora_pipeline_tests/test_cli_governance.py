"""`intake --rights`, `rights`, `retire` and `unretire` run as a user runs them: a subprocess, JSON, one-line errors."""

from __future__ import annotations

import json
import shutil

from lora_pipeline_tests.helpers import assert_one_line_error, cli, tree_state

VERSION = "hardware-design-aesthetic-v1"  # its spec names batch curated-2026-10


def test_rights_at_intake_and_later_and_retiring_a_batch_named_by_a_spec(sample_root, tmp_path):
    handoff = tmp_path / "handoff"
    shutil.copytree(sample_root.batch("curated-2026-10"), handoff)
    (handoff / "_READY").unlink()
    out = json.loads(
        cli(
            "intake", str(handoff), "--batch", "owned-2026-12", "--rights", "owned", "--holder", "ACME Studio", "--json"
        ).stdout
    )
    assert out["rights"] == {"rights": "owned", "holder": "ACME Studio", "record": 1}
    assert_one_line_error(
        cli("intake", str(handoff), "--batch", "lic-2026-12", "--rights", "licensed", check=False), "needs a licence"
    )
    assert not sample_root.batch("lic-2026-12").exists()  # refused before anything was copied

    changed = json.loads(
        cli(
            "rights",
            "batch:owned-2026-12",
            "--rights",
            "licensed",
            "--licence",
            "CC-BY-4.0",
            "--reason",
            "sold to a partner",
            "--json",
        ).stdout
    )
    assert changed["rights"]["rights"] == "licensed" and len(changed["history"]) == 2
    assert changed["history"][0]["rights"] == "owned" and changed["history"][1]["reason"] == "sold to a partner"
    shown = cli("rights", "batch:curated-2026-10").stdout
    assert "batch curated-2026-10: unknown (no record)" in shown
    assert_one_line_error(cli("rights", "batch:curated-2026-10", "--licence", "MIT", check=False), "need --rights")

    before = tree_state(sample_root.batch("curated-2026-10"))
    retired = json.loads(cli("retire", "batch:curated-2026-10", "--reason", "banned word", "--json").stdout)
    assert retired["action"] == "retire" and retired["reason"] == "banned word" and retired["recorded_by"]
    assert_one_line_error(cli("build", VERSION, check=False), "batch 'curated-2026-10' is retired", "banned word")
    assert_one_line_error(cli("retire", "batch:curated-2026-10", "--reason", "again", check=False), "already retired")
    assert tree_state(sample_root.batch("curated-2026-10")) == before
    assert "unretired" in cli("unretire", "batch:curated-2026-10", "--reason", "caption fixed").stdout
    assert json.loads(cli("build", VERSION, "--json").stdout)["counts"]["by_rights"] == {"unknown": 8}
