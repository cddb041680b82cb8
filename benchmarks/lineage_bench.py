"""The lineage index at a team's scale: 1,000 dataset versions, 100,000 source files, 2,000 LoRA files.

Target: `lora-pipeline lineage` answers in <= 1 s in every direction.

    .venv/bin/python benchmarks/lineage_bench.py [--workdir DIR] [--versions 1000] [--files 100000] [--loras 2000]
                                                 [--runs 5]

The synthetic store is written straight to disk (the slow parts skipped: no image bytes, no validation): what
the index reads is real in shape, namely each version's manifest.jsonl, snapshot.json, report.json and seal.json,
the LoRA files' safetensors headers and the evaluations' recommendation.json. Source files are named in the
manifests but not written (the index never reads them). The versions form families of chains: a family's
first version takes 50 images (and their sidecar captions) of its batch; each next one takes the previous
version as its parent plus 50 new images of the batch; every tenth family merges the previous version of the
next family instead (a `merge: true` spec). Every tenth version is blocked (an error in its report). LoRA
files: `--loras` epoch files spread over the versions; half the trained versions have a recommendation.

Printed: the store's size, the index's build time (`lineage --rebuild`), the catch-up check a query does
first, and each direction's query time (best and median of `--runs`, in-process: open the index, catch up,
answer), plus one `lora-pipeline lineage` as a subprocess (the interpreter's start included).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from lora_pipeline.core.lineage.lineage_index import index_path, open_index, rebuild_index, refresh
from lora_pipeline.core.lineage.lineage_query import lineage
from lora_pipeline.core.paths import MANIFEST, REPORT_JSON, SEAL, SNAPSHOT, DataRoot

PER_STEP = 50  # images a version adds
FAMILY_LENGTH = 10  # versions per family (chain)
RECIPE = "style"


def _sha(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def version_name(family: int, gen: int) -> str:
    return f"family{family:03d}-v{gen + 1}"


def _rows(version: str, batch: str, first: int, parent_rows: list[dict]) -> list[dict]:
    """The parent's images (inherited), 50 new images of the batch, and a sidecar caption for every image."""
    folder = "img/10_trg"
    rows = [
        {
            **{k: v for k, v in r.items() if not k.startswith("source_")},
            "source_dataset": r["_version"],
            "source_path": r["path"],
            "source_sha256": r["sha256"],
        }
        for r in parent_rows
    ]
    for j in range(first, first + PER_STEP):
        sha = _sha(batch, j, "png")
        rows.append(
            {
                "path": f"{folder}/{batch}-{j:04d}.png",
                "kind": "image",
                "sha256": sha,
                "bytes": 1000,
                "width": 1024,
                "height": 1024,
                "source_batch": batch,
                "source_path": f"{j:04d}.png",
                "source_sha256": sha,
                "origin_batch": batch,
                "origin_path": f"{j:04d}.png",
                "origin_sha256": sha,
            }
        )
    for r in rows:
        r["_version"] = version
    captions = [
        {
            "path": r["path"][:-4] + ".txt",
            "kind": "caption",
            "sha256": _sha(version, r["path"]),
            "bytes": 40,
            "image": r["path"],
            "caption_source": f"sidecar:{r['origin_batch']}",
            "source_batch": r["origin_batch"],
            "source_path": r["origin_path"][:-4] + ".txt",
            "source_sha256": _sha(r["origin_batch"], r["origin_path"], "txt"),
        }
        for r in rows
    ]
    return rows + captions


def _write_version(
    root: DataRoot, version: str, rows: list[dict], parents: list[str], merge: bool, blocked: bool
) -> None:
    folder = root.dataset(version)
    manifest = "".join(
        json.dumps({k: v for k, v in r.items() if k != "_version"}, sort_keys=True) + "\n"
        for r in sorted(rows, key=lambda r: r["path"])
    )
    _write(folder / MANIFEST, manifest)
    root_hash = _sha(version, "root")
    _write(
        folder / SNAPSHOT,
        json.dumps(
            {
                "version": version,
                "manifest_root": root_hash,
                "spec": {"name": version, "merge": merge, "intent": f"bench {version}"},
                "spec_sha256": _sha(version, "spec"),
                "parents": parents,
                "created_at": "2026-12-06T00:00:00Z",
                "captions_complete": True,
            }
        ),
    )
    problems = (
        [
            {
                "file": rows[0]["path"],
                "code": "too_small",
                "severity": "error",
                "message": "shorter side 300 px",
                "scope": f"dataset:{version}",
            }
        ]
        if blocked
        else []
    )
    _write(
        folder / REPORT_JSON,
        json.dumps({"version": version, "manifest_root": root_hash, "passed": not blocked, "problems": problems}),
    )
    _write(folder / SEAL, json.dumps({"version": version, "manifest_root": root_hash, "files": {}}))


def build_store(root: DataRoot, versions: int, files: int, loras: int) -> dict[str, int]:
    """Write the synthetic store (see the module docstring); returns its counts."""
    families = max(1, versions // FAMILY_LENGTH)
    per_batch = files // families // 2  # images per batch (each with a sidecar)
    rows_of: dict[str, list[dict]] = {}  # the image rows of the previous generation (the parents)
    names, manifest_rows = [], 0
    for gen in range(FAMILY_LENGTH):
        parents_of, rows_of = rows_of, {}
        for family in range(families):
            version, batch = version_name(family, gen), f"batch{family:03d}"
            merge = gen > 0 and family % 10 == 9
            parent = version_name((family + 1) % families if merge else family, gen - 1) if gen else None
            rows = _rows(version, batch, (gen * PER_STEP) % max(per_batch, PER_STEP), parents_of.get(parent, []))
            rows_of[version] = [r for r in rows if r["kind"] == "image"]
            names.append(version)
            manifest_rows += len(rows)
            _write_version(
                root, version, rows, [parent] if parent else [], merge, blocked=int(_sha(version)[:8], 16) % 10 == 0
            )
    names.sort()
    trained = names[: max(1, loras // 2)]
    for i, version in enumerate(trained):
        for epoch in (1, 2):
            path = root.loras(version, RECIPE) / f"{version}-{RECIPE}-e{epoch:03d}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(
                {"x": np.zeros(4, dtype=np.float32)},
                str(path),
                metadata={
                    "lora_pipeline.dataset_version": version,
                    "lora_pipeline.recipe": RECIPE,
                    "lora_pipeline.epoch": str(epoch),
                    "ss_steps": str(100 * epoch),
                    "sshs_model_hash": _sha(version, epoch, "tensors"),
                    "lora_pipeline.mlflow_run_id": _sha(version)[:32],
                    "lora_pipeline.manifest_root": _sha(version, "root"),
                },
            )
        if i % 2 == 0:
            rec = {
                "version": version,
                "recipe": RECIPE,
                "recommended_epoch": 2,
                "training_run_id": _sha(version)[:32],
                "recommended_file": f"loras/{version}/{RECIPE}/{version}-{RECIPE}-e002.safetensors",
            }
            _write(root.evals(version, RECIPE) / "recommendation.json", json.dumps(rec))
    return {
        "versions": len(names),
        "batches": families,
        "source_files": families * per_batch * 2,
        "manifest_rows": manifest_rows,
        "lora_files": 2 * len(trained),
        "recommendations": (len(trained) + 1) // 2,
    }


def _timed(fn, runs: int) -> tuple[str, object]:
    """Best and median wall time of `runs` calls, and the CPU time (process_time) of the best: on a shared machine
    the wall time waits for a core, the CPU time is what a quiet one would take."""
    times, result = [], None
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    best = min(times)
    median = statistics.median(t for t, _ in times)
    return f"best {best[0] * 1e3:5.0f} ms (CPU {best[1] * 1e3:4.0f} ms), median {median * 1e3:5.0f} ms", result


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed after")
    parser.add_argument("--versions", type=int, default=1000)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--loras", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = DataRoot(Path(tmp) / "data")
        print(
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.platform()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, load {os.getloadavg()[0]:.2f}"
        )
        started = time.perf_counter()
        counts = build_store(root, args.versions, args.files, args.loras)
        print(f"store written in {time.perf_counter() - started:.1f} s: {counts}")
        print(
            f"manifests etc. {_folder_bytes(root.datasets) / 1e6:.1f} MB, LoRA headers "
            f"{_folder_bytes(root.loras_root) / 1e6:.1f} MB"
        )
        started, cpu = time.perf_counter(), time.process_time()
        read = rebuild_index(root)
        print(
            f"index build (lineage --rebuild): {time.perf_counter() - started:.1f} s (CPU "
            f"{time.process_time() - cpu:.1f} s), {read} files read, "
            f"index {index_path(root).stat().st_size / 1e6:.1f} MB"
        )

        def catch_up() -> int:
            with closing(open_index(root, catch_up=False)) as conn:
                return refresh(conn, root)

        timing, _ = _timed(catch_up, args.runs)
        print(f"catch-up check (nothing changed): {timing}")
        # family 10's versions are parents in their own chain and, through merges, of family 9's (see build_store)
        family = min(10, max(1, args.versions // FAMILY_LENGTH) - 1)
        probe, batch = version_name(family, FAMILY_LENGTH // 2), f"batch{family:03d}"
        lora = root.loras(probe, RECIPE) / f"{probe}-{RECIPE}-e002.safetensors"
        targets = {
            "batch": f"batch:{batch}",
            "file (batch path)": f"file:{batch}/{PER_STEP:04d}.png",
            "file (sha256)": f"file:{_sha(batch, PER_STEP, 'png')}",
            "version": f"version:{probe}",
            "lora": f"lora:{lora}",
        }
        for label, target in targets.items():
            timing, answer = _timed(lambda target=target: lineage(root, target), args.runs)
            size = len(answer.get("versions") or answer.get("descendants") or [])
            print(f"query {label:18} {timing} ({size} versions, {len(answer.get('trainings', []))} trainings)")
        env = {**os.environ, "LORA_PIPELINE_DATA": str(root.root)}
        command = [sys.executable, "-m", "lora_pipeline.cli", "lineage", f"batch:{batch}"]
        timing, _ = _timed(lambda: subprocess.run(command, env=env, check=True, capture_output=True), args.runs)
        print(
            f"`lora-pipeline lineage batch:{batch}` as a subprocess (the interpreter's start and imports included): "
            f"{timing.split(' (CPU')[0]}, median {timing.split('median ')[1]}; load {os.getloadavg()[0]:.2f}"
        )


if __name__ == "__main__":
    main()
