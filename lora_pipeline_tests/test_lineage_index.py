"""The lineage index and `lora-pipeline lineage`: the bundled v1 (a batch), v2 (v1 as its parent plus a batch) and
the promoted merge (v2 merged with a batch of generated candidates), built with the real steps, plus LoRA files
headed by the trainer's own header builder and a recommendation as the evaluation writes it."""

from __future__ import annotations

import json
import shutil
import sqlite3
from contextlib import closing

import pytest

from lora_pipeline.core.datasets.snapshot.manifest import read_manifest
from lora_pipeline.core.datasets.snapshot.snapshot import build_snapshot
from lora_pipeline.core.datasets.spec import load_spec
from lora_pipeline.core.errors import UserError
from lora_pipeline.core.fileio import write_json
from lora_pipeline.core.lineage.lineage_index import (
    index_findings,
    index_path,
    index_rows,
    open_index,
    rebuild_index,
    refresh,
    update_index,
)
from lora_pipeline.core.lineage.lineage_query import lineage
from lora_pipeline.core.lineage.lineage_text import format_lineage
from lora_pipeline.core.paths import DataRoot
from lora_pipeline_tests.helpers import (
    DEMO_GROUP,
    DEMO_RECIPE,
    DEMO_V1,
    DEMO_V2,
    assert_one_line_error,
    cli,
    committed_data,
    finish_version,
)

MERGE = "hardware-promoted-merge-v1"
CURATED, TURNTABLE, PROMOTED = "curated-2026-10", "turntable-renders-2026-11", "promoted-candidates-2026-11"


def _write_loras(root: DataRoot, version: str, epochs: int, run_id: str, base: str) -> list[str]:
    """Epoch files of `version` x demo-tiny headed by build_metadata (the index reads only the header), on the
    tiny model folder `base`, so that their provenance checks out."""
    import torch

    from lora_pipeline.core.datasets.snapshot.manifest import read_snapshot_info
    from lora_pipeline.core.models.model_hash import base_model_hash
    from lora_pipeline.core.training.kohya.lora_file import LoraProvenance, build_metadata, save_lora
    from lora_pipeline.core.training.recipe import load_recipe
    from lora_pipeline.core.training.run.checkpoint import epoch_file_name

    recipe = load_recipe(root.recipe_file(DEMO_RECIPE))
    info = read_snapshot_info(root.dataset(version))
    provenance = LoraProvenance(
        version, info.manifest_root, info.spec_sha256, base, base_model_hash(base), "commit", run_id
    )
    files = []
    for epoch in range(1, epochs + 1):
        metadata = build_metadata(
            recipe=recipe,
            provenance=provenance,
            epoch=epoch,
            steps=4 * epoch,
            max_train_steps=4 * epochs,
            num_train_images=8,
            num_batches_per_epoch=4,
            tag_frequency={},
            dataset_dirs={},
            training_started_at=1_700_000_000.0,
        )
        path = root.loras(version, DEMO_RECIPE) / epoch_file_name(version, DEMO_RECIPE, epoch)
        alpha = torch.tensor(float(len(version) * 10 + epoch))  # tensors differ per file (their hash finds a copy)
        save_lora(path, {"lora_unet_x.alpha": alpha}, metadata)
        files.append(path.relative_to(root.root).as_posix())
    return files


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model) -> DataRoot:
    """v1, v2 and the merge built and sealed; v2 trained (3 epochs, epoch 2 recommended), the merge trained (2)."""
    root = DataRoot(tmp_path_factory.mktemp("lineage") / "data")
    for part in ("sources", "specs", "recipes"):
        shutil.copytree(committed_data() / part, root.root / part)
    for version in (DEMO_V1, DEMO_V2, MERGE):
        spec = load_spec(root.spec_file(version))
        build_snapshot(root, spec, "test-commit")
        finish_version(root, spec)
    root.models.mkdir(parents=True)
    (root.models / "tiny-sd").symlink_to(tiny_model("tiny-sd"))  # as a user links a model folder, and training finds it
    base = str(root.models / "tiny-sd")
    files = _write_loras(root, DEMO_V2, 3, "run-v2", base)
    _write_loras(root, MERGE, 2, "run-merge", base)
    write_json(
        root.evals(DEMO_V2, DEMO_RECIPE) / "recommendation.json",
        {
            "version": DEMO_V2,
            "recipe": DEMO_RECIPE,
            "recommended_epoch": 2,
            "recommended_file": files[1],
            "training_run_id": "run-v2",
        },
    )
    return root


@pytest.fixture
def own_store(store, tmp_path) -> DataRoot:
    """A copy of `store` that a test may change."""
    shutil.copytree(store.root, tmp_path / "data", symlinks=True)
    return DataRoot(tmp_path / "data")


def _by_version(answer: dict) -> dict:
    return {v["version"]: v for v in answer["versions"]}


def test_a_batch_used_directly_through_a_parent_and_through_a_merge(store):
    answer = lineage(store, f"batch:{CURATED}")
    found = _by_version(answer)
    assert set(found) == {DEMO_V1, DEMO_V2, MERGE}
    assert found[DEMO_V1]["direct"] and found[DEMO_V1]["through"] == []
    assert not found[DEMO_V2]["direct"] and found[DEMO_V2]["through"] == [DEMO_V1] and not found[DEMO_V2]["merge"]
    assert not found[MERGE]["direct"] and found[MERGE]["through"] == [DEMO_V2] and found[MERGE]["merge"]
    assert found[DEMO_V1]["images"] == found[DEMO_V2]["images"] == found[MERGE]["images"] == 8
    trainings = {(t["version"], t["recipe"]): t for t in answer["trainings"]}
    assert set(trainings) == {(DEMO_V2, DEMO_RECIPE), (MERGE, DEMO_RECIPE)}
    v2 = trainings[DEMO_V2, DEMO_RECIPE]
    assert v2["epochs"] == [1, 2, 3] and v2["mlflow_run_ids"] == ["run-v2"] and v2["recommended_epoch"] == 2
    assert "recommended_epoch" not in trainings[MERGE, DEMO_RECIPE]  # trained, not evaluated

    promoted = lineage(store, f"batch:{PROMOTED}")
    assert list(_by_version(promoted)) == [MERGE] and promoted["versions"][0]["direct"]
    assert [t["version"] for t in promoted["trainings"]] == [MERGE]

    text = format_lineage(answer)
    assert f"{DEMO_V2}: through {DEMO_V1}" in text and f"{MERGE}: merge of {DEMO_V2}" in text
    assert f"recommended epoch 2: {v2['recommended_file']}" in text


def test_a_version_up_and_down(store):
    merge = lineage(store, f"version:{MERGE}")
    batches = {b["batch"]: b for b in merge["batches"]}
    assert set(batches) == {CURATED, TURNTABLE, PROMOTED}
    assert batches[PROMOTED]["direct"] > 0 and batches[PROMOTED]["inherited"] == 0
    assert batches[CURATED]["direct"] == 0 and batches[CURATED]["inherited"] == 8  # the images; v2 re-captioned
    assert [a["version"] for a in merge["ancestors"]] == [DEMO_V2, DEMO_V1]
    assert merge["version"]["merge"] and merge["version"]["passed"] and merge["descendants"] == []

    v1 = lineage(store, f"version:{DEMO_V1}")
    assert [d["version"] for d in v1["descendants"]] == [DEMO_V2, MERGE]
    assert {t["version"] for t in v1["trainings"]} == {DEMO_V2, MERGE}


def test_a_source_file_by_path_by_batch_path_and_by_sha256(store):
    row = next(r for r in read_manifest(store.dataset(DEMO_V1)) if r.kind == "image")
    source = store.batch(CURATED) / row.source_path
    by_path = lineage(store, f"file:{source}")
    assert set(_by_version(by_path)) == {DEMO_V1, DEMO_V2, MERGE}
    assert _by_version(by_path)[DEMO_V1]["path"] == row.path and _by_version(by_path)[DEMO_V1]["direct"]
    assert _by_version(by_path)[MERGE]["through"] == [DEMO_V2]
    assert lineage(store, f"file:{CURATED}/{row.source_path}")["versions"] == by_path["versions"]
    assert lineage(store, f"file:{store.dataset(DEMO_V2) / row.path}")["versions"] == by_path["versions"]
    by_sha = lineage(store, f"file:{row.source_sha256}")
    assert {v["version"] for v in by_sha["versions"]} == {DEMO_V1, DEMO_V2, MERGE}
    caption = next(r for r in read_manifest(store.dataset(DEMO_V1)) if r.kind == "caption")
    sidecar = lineage(store, f"file:{CURATED}/{caption.source_path}")  # v2 wrote its own captions
    assert list(_by_version(sidecar)) == [DEMO_V1]
    with pytest.raises(UserError, match="no dataset version"):
        lineage(store, f"file:{'0' * 64}")


def test_a_lora_file_by_path_and_a_copy_by_its_header(store, tmp_path):
    v2 = lineage(store, f"version:{DEMO_V2}")
    files = next(t for t in v2["trainings"] if t["version"] == DEMO_V2)["files"]
    answer = lineage(store, f"lora:{store.root / files[2]}")
    assert answer["lora"]["epoch"] == 3 and answer["lora"]["recommended_epoch"] == 2
    assert answer["lora"]["mlflow_run_id"] == "run-v2" and answer["version"]["version"] == DEMO_V2
    assert {b["batch"] for b in answer["batches"]} == {CURATED, TURNTABLE}
    copy = tmp_path / "comfyui" / "my-style.safetensors"
    copy.parent.mkdir()
    shutil.copyfile(store.root / files[1], copy)
    assert lineage(store, f"lora:{copy}")["lora"]["file"] == files[1]
    assert "the recommended epoch" in format_lineage(lineage(store, f"lora:{copy}"))


def test_the_incremental_index_equals_the_rebuilt_one(own_store):
    root = own_store
    index_path(root).unlink(missing_ok=True)
    for version in (DEMO_V1, DEMO_V2, MERGE):  # as dataset_report, lora_epochs and evaluation_grid call it
        update_index(root, version)
    for version in (DEMO_V2, MERGE):
        update_index(root, version, DEMO_RECIPE)
    with closing(open_index(root, catch_up=False)) as conn:
        incremental = index_rows(conn)
        assert refresh(conn, root) == 0  # nothing left for a query to catch up with
    assert len(incremental["files"]) > 0 and len(incremental["loras"]) == 5
    rebuild_index(root)
    with closing(open_index(root, catch_up=False)) as conn:
        assert index_rows(conn) == incremental

    gone = next(root.loras(MERGE, DEMO_RECIPE).glob("*.safetensors"))
    gone.unlink()  # a file removed by hand: the next query drops its row
    assert len(lineage(root, f"version:{MERGE}")["trainings"][0]["files"]) == 1
    with closing(open_index(root, catch_up=False)) as conn:
        caught_up = index_rows(conn)
    rebuild_index(root)
    with closing(open_index(root, catch_up=False)) as conn:
        assert index_rows(conn) == caught_up


def test_verify_catches_a_tampered_index(own_store):
    root = own_store
    rebuild_index(root)
    assert index_findings(root) == []
    with closing(sqlite3.connect(index_path(root))) as conn, conn:
        conn.execute("UPDATE uses SET version = 'made-up-v9' WHERE batch = ?", (PROMOTED,))
        conn.execute("DELETE FROM loras WHERE epoch = 1")
    findings = index_findings(root)
    assert len(findings) == 2 and all("lineage --rebuild" in f for f in findings)
    assert "table uses has 1 row(s)" in findings[0] or "table uses has 1 row(s)" in findings[1]
    assert index_findings(root, [DEMO_V1]) == []  # only the named versions' rows are compared
    assert len(index_findings(root, [MERGE])) == 2
    rebuild_index(root)
    assert index_findings(root) == []

    index_path(root).write_bytes(b"not a database")  # damaged: verify names it, a query derives it again
    assert ["not a lineage index" in f for f in index_findings(root)] == [True]
    assert {v["version"] for v in lineage(root, f"batch:{PROMOTED}")["versions"]} == {MERGE}
    assert index_findings(root) == []


def test_cli_lineage_exit_codes_and_verify(own_store, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_PIPELINE_DATA", str(own_store.root))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    answer = json.loads(cli("lineage", f"batch:{CURATED}", "--json").stdout)
    assert {v["version"] for v in answer["versions"]} == {DEMO_V1, DEMO_V2, MERGE}
    assert f"{MERGE}: merge of {DEMO_V2}" in cli("lineage", f"batch:{CURATED}").stdout
    rebuilt = json.loads(cli("lineage", "--rebuild", "--json").stdout)
    assert rebuilt["files_read"] == 3 + 5 + 1  # seals, LoRA files, recommendation
    assert_one_line_error(
        cli("lineage", "batch:curated-2026-1", check=False), "curated-2026-1", "closest: curated-2026-10"
    )
    assert_one_line_error(cli("lineage", "curated-2026-10", check=False), "batch:<id>")
    assert_one_line_error(cli("lineage", "version:never-built", check=False), "never-built", "not in the lineage")
    assert_one_line_error(cli("lineage", "lora:/no/such.safetensors", check=False), "/no/such.safetensors")
    assert_one_line_error(cli("lineage", check=False), "batch:<id>")

    with closing(sqlite3.connect(index_path(own_store))) as conn, conn:
        conn.execute("DELETE FROM parents")
    result = cli("verify", "--json", check=False)
    assert result.returncode == 1
    assert any("table parents" in f for f in json.loads(result.stdout)["findings"])


def test_a_retired_batch_is_flagged_on_every_version_training_and_lora_built_on_it(own_store, tmp_path, monkeypatch):
    from lora_pipeline.core.datasets.sources.retired import retire, unretire

    root = own_store
    assert lineage(root, f"batch:{CURATED}")["retired"] == {}
    record = retire(root, TURNTABLE, "licence withdrawn by the render studio")
    answer = lineage(root, f"batch:{TURNTABLE}")
    assert answer["retired"][TURNTABLE]["reason"] == "licence withdrawn by the render studio"
    on_it = {DEMO_V2: [TURNTABLE], MERGE: [TURNTABLE]}
    assert {v["version"]: v["retired_batches"] for v in answer["versions"]} == on_it
    assert [t["retired_batches"] for t in answer["trainings"]] == [[TURNTABLE], [TURNTABLE]]
    text = format_lineage(answer)
    assert text.splitlines()[0] == f"RETIRED batch {TURNTABLE}: {record.line}"
    assert f"{DEMO_V2} x {DEMO_RECIPE}: epochs 1-3 (3 files), MLflow run run-v2; built on RETIRED batch(es) " in text

    v1 = lineage(root, f"version:{DEMO_V1}")  # v1 holds none of it; its descendants do
    assert v1["version"]["retired_batches"] == [] and v1["retired"].keys() == {TURNTABLE}
    assert {d["version"]: d["retired_batches"] for d in v1["descendants"]} == on_it
    merge = lineage(root, f"version:{MERGE}")
    assert {b["batch"]: (b["retired"] or {}).get("action") for b in merge["batches"]} == {
        CURATED: None, TURNTABLE: "retire", PROMOTED: None
    }
    assert f"  {TURNTABLE} RETIRED: " in format_lineage(merge)

    monkeypatch.setenv("LORA_PIPELINE_DATA", str(root.root))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    lora = next(root.loras(DEMO_V2, DEMO_RECIPE).glob("*.safetensors"))
    data = json.loads(cli("lineage", f"lora:{lora}", "--json").stdout)
    assert data["lora"]["retired_batches"] == data["version"]["retired_batches"] == [TURNTABLE]
    assert data["retired"][TURNTABLE]["recorded_by"] == record.recorded_by
    text = cli("lineage", f"lora:{lora}").stdout
    assert f"RETIRED batch {TURNTABLE}: retired " in text and f"built on RETIRED batch(es) {TURNTABLE}" in text

    unretire(root, TURNTABLE, "licence renewed")
    again = lineage(root, f"lora:{lora}")
    assert again["retired"] == {} and again["lora"]["retired_batches"] == [] and "RETIRED" not in format_lineage(again)


@pytest.mark.xdist_group(DEMO_GROUP)
def test_the_assets_keep_the_index_up_to_date(trained_demo):
    """The demo partition was built, trained and evaluated through Dagster: each asset updated the index, so a
    query has nothing to catch up with, and the index is the one the data root gives."""
    root = trained_demo.root
    with closing(open_index(root, catch_up=False)) as conn:
        assert refresh(conn, root) == 0
    assert index_findings(root) == []
    answer = lineage(root, f"batch:{CURATED}")
    assert {v["version"] for v in answer["versions"]} == {DEMO_V1, DEMO_V2}
    (training,) = answer["trainings"]
    recommendation = trained_demo.evaluated.metadata("evaluation_grid")["recommended_epoch"]
    assert training["recommended_epoch"] == recommendation
    assert training["mlflow_run_ids"] == [trained_demo.trained.metadata("lora_epochs")["mlflow_run_id"]]


def test_provenance_prints_a_summary_per_batch_and_the_images_only_with_files(store, monkeypatch, tmp_path):
    from lora_pipeline.core.lineage.provenance import trace_lora
    from lora_pipeline.core.lineage.provenance_text import batch_summary, format_with_summary

    lora = next(store.loras(MERGE, DEMO_RECIPE).glob("*.safetensors"))
    chain = trace_lora(store, lora)
    assert chain.status == "ok"
    rows = {r["source"]: r for r in batch_summary(chain)}
    assert set(rows) == {f"batch:{CURATED}", f"batch:{TURNTABLE}", f"batch:{PROMOTED}"}
    assert sum(r["images"] for r in rows.values()) == len(chain.images) == 26
    assert rows[f"batch:{CURATED}"]["images"] == rows[f"batch:{CURATED}"]["captions"] == 8
    assert rows[f"batch:{CURATED}"]["changed_or_missing"] == 0
    summary = format_with_summary(chain)
    assert f"batch:{CURATED}: 8 images, 8 captions" in summary and "source files unchanged" in summary
    assert "caption:" not in summary and chain.images[0].path not in summary  # no per-image rows
    assert len(summary.splitlines()) < 20
    full = format_with_summary(chain, files=True)
    assert chain.images[0].path in full and full.count("caption:") == 26

    monkeypatch.setenv("LORA_PIPELINE_DATA", str(store.root))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    assert cli("provenance", str(lora)).stdout.strip() == summary
    assert chain.images[0].path in cli("provenance", str(lora), "--files").stdout
    data = json.loads(cli("provenance", str(lora), "--json").stdout)
    assert len(data["images"]) == 26 and {b["source"] for b in data["batch_summary"]} == set(rows)
