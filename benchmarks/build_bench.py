"""The whole `lora-pipeline build` of a fresh version: where its time goes, and how it grows with the batch.

    .venv/bin/python benchmarks/build_bench.py split  [--workdir DIR] [--count 1000] [--runs 3] [--before SRC]
    .venv/bin/python benchmarks/build_bench.py growth [--workdir DIR] [--sizes 1000,5000,20000] [--size 640x512]

`split` builds fresh versions of snapshot_bench.py's batch of ~1 MP JPEGs (with a sidecar caption each) in a
child process that runs the command line in-process with a wall-clock timer around each stage's function
(names that the code under test lacks are left out), and prints the median split of `--runs` builds. The
child's own start (interpreter and imports) is counted from the process's creation time.

`growth` generates one batch of `max(--sizes)` smaller JPEGs (`--size`, cheap to make; the per-image decode
cost scales with the pixels, the per-image bookkeeping does not) with sidecar captions, and builds one fresh
version over the first N of them for each N with `lora-pipeline build` as a subprocess, sampling the resident
memory of the command and all its descendants (the decode workers) every 50 ms.

Every figure is printed with the load average: the machine is shared, so absolute times are noisy.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from snapshot_bench import CLI, build_env, ensure_captioned_batch, fresh_version, write_spec  # noqa: E402

# (label, module, function): each is timed where the caller looks it up. Nested stages are subtracted from
# their parent's own line, so the lines add up to the whole command.
STAGES: list[tuple[str, str, str, str | None]] = [
    ("register partitions", "lora_pipeline.cli_jobs", "_register", None),
    ("Dagster run (definitions, events, step bookkeeping)", "lora_pipeline.runs.jobs", "run_job", None),
    ("snapshot (copy, manifest)", "lora_pipeline.defs.datasets", "build_snapshot", "run_job"),
    ("captions: plan (read sidecars, lint)", "lora_pipeline.defs.datasets", "plan_captions", "run_job"),
    ("captions: write .txt files", "lora_pipeline.defs.datasets", "write_captions", "run_job"),
    ("captions: captions.json, manifest rows", "lora_pipeline.defs.datasets", "write_caption_check", "run_job"),
    ("captions: captions.json, manifest rows", "lora_pipeline.defs.datasets", "record_captions", "run_job"),
    ("report: load captions", "lora_pipeline.defs.datasets", "load_caption_check", "run_job"),
    ("validation: decode, hashes (process pool)", "lora_pipeline.core.datasets.checks.validation", "inspect_images",
     "validate_dataset"),
    ("validation: decode, hashes (process pool)", "lora_pipeline.core.datasets.checks.validation", "inspect_batch",
     "validate_dataset"),
    ("validation: waiting for the early decode", "lora_pipeline.core.datasets.checks.validation", "take_early",
     "validate_dataset"),
    ("snapshot: starting the early decode", "lora_pipeline.defs.datasets", "start_early", "run_job"),
    ("validation: near duplicates", "lora_pipeline.core.datasets.checks.validation", "_duplicates", "validate_dataset"),
    ("validation: the rest", "lora_pipeline.defs.datasets", "validate_dataset", "run_job"),
    ("contact sheet", "lora_pipeline.core.datasets.checks.report", "write_contact_sheet", "write_report"),
    ("report.json, report.md", "lora_pipeline.defs.datasets", "write_report", "run_job"),
    ("seal", "lora_pipeline.defs.datasets", "seal_snapshot", "run_job"),
    ("metadata: contact sheet preview", "lora_pipeline.defs.datasets", "image_markdown", "run_job"),
    ("metadata: tables", "lora_pipeline.defs.datasets", "table", "run_job"),
    ("metadata: tables", "lora_pipeline.defs.datasets", "problems_metadata", "run_job"),
]


def timed_child(version: str) -> None:
    """Run `lora-pipeline build VERSION` in this process with timers; print the stage seconds as JSON."""
    started = psutil.Process().create_time()
    import lora_pipeline.cli as cli
    import lora_pipeline.defs.datasets  # noqa: F401  (the module the defs loader imports, so its names are ours)
    import lora_pipeline.runs.jobs  # noqa: F401  (imported before the timers, as the CLI imports it)

    spent: dict[str, float] = {}
    parents: dict[str, str | None] = {}
    for _, module_name, name, parent in STAGES:
        module = importlib.import_module(module_name)
        if not hasattr(module, name):
            continue
        parents[name] = parent
        setattr(module, name, _timer(getattr(module, name), name, spent))
    imports_done = time.time()
    out = {"CLI start (interpreter, imports)": imports_done - started}
    code = cli.main(["build", version, "--json"])
    total = time.time() - started
    if code != 0:
        raise SystemExit(f"build failed with exit code {code}")
    own = dict(spent)
    for name, parent in parents.items():
        if parent and parent in own and name in spent:
            own[parent] -= spent[name]
    for label, _, name, _ in STAGES:
        if name in own:
            out[label] = out.get(label, 0.0) + own.pop(name)
    out["CLI: the rest (spec, summary)"] = total - sum(out.values())
    out["whole command"] = total
    print(json.dumps(out))


def _timer(fn: Callable[..., Any], name: str, spent: dict[str, float]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t

    return run


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def split(args: argparse.Namespace) -> None:
    """The median split of `--runs` builds; with `--before SRC` (a checkout of the code before), each run
    builds once with that code (PYTHONPATH=SRC) and once with this, interleaved, and both are printed."""
    from lora_pipeline.core.paths import DataRoot

    root = DataRoot(args.workdir.resolve() / "data")
    batch = ensure_captioned_batch(root, args.count)
    variants = {"before": str(args.before), "after": None} if args.before else {"this code": None}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    loads = []
    for _ in range(args.runs):
        for name, pythonpath in variants.items():
            version = fresh_version(root.root, "split")
            write_spec(root.root, version, batch)
            env = build_env(args.workdir)
            if pythonpath:
                env["PYTHONPATH"] = pythonpath
            before = load()
            child = subprocess.run([sys.executable, __file__, "_child", version], env=env,
                                   check=True, capture_output=True, text=True)
            runs[name].append(json.loads(child.stdout.strip().splitlines()[-1]))
            loads.append(f"{name} {before} / {load()}")
    print(f"whole build split, {args.count} images ({batch}), median of {args.runs} runs each")
    print("load average (1/5/15 min) before / after each run: " + "; ".join(loads))
    labels = list(dict.fromkeys(label for results in runs.values() for label in results[0]))
    totals = {name: statistics.median(r["whole command"] for r in results) for name, results in runs.items()}
    print(f"  {'stage':<52}" + "".join(f"{name:>18}" for name in runs))
    for label in labels:
        cells = []
        for name, results in runs.items():
            seconds = statistics.median(r.get(label, 0.0) for r in results)
            cells.append(f"{seconds:8.2f} s {100 * seconds / totals[name]:5.1f}%")
        print(f"  {label:<52}" + "".join(f"{c:>18}" for c in cells))
    print(f"  {'images/s for the whole command':<52}" + "".join(f"{args.count / t:>18.0f}" for t in totals.values()))


def make_small_jpeg(job: tuple[Path, int, tuple[int, int]]) -> None:
    """A distinct picture per seed: random low-frequency waves (the structure dHash sees) plus fine noise."""
    path, seed, (w, h) = job
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    freq, phase = rng.uniform(1, 9, (3, 2)), rng.uniform(0, 6.28, 3)
    channels = [128 + 110 * np.sin(freq[c, 0] * x * 6 + freq[c, 1] * y * 6 + phase[c]) for c in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    tmp = path.with_suffix(".part")
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(tmp, "JPEG", quality=90)
    os.replace(tmp, path)
    path.with_suffix(".txt").write_text(f"bench, wave study {seed}, seed {seed % 97}\n")


def ensure_growth_batch(workdir: Path, count: int, size: tuple[int, int]) -> str:
    from lora_pipeline.core.datasets.sources.batches import batch_manifest, scan_batch
    from lora_pipeline.core.datasets.sources.hashcache import RACY_NS
    from lora_pipeline.core.paths import READY_MARKER, DataRoot

    root, batch = DataRoot(workdir / "data"), f"growth-{size[0]}x{size[1]}"
    top = root.batch(batch)
    top.mkdir(parents=True, exist_ok=True)
    jobs = [(top / f"img_{i:05d}.jpg", i, size) for i in range(count) if not (top / f"img_{i:05d}.jpg").exists()]
    if jobs:
        (top / READY_MARKER).unlink(missing_ok=True)
        started = time.perf_counter()
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(make_small_jpeg, jobs, chunksize=64))
        print(f"generated {len(jobs)} JPEGs {size[0]}x{size[1]} in {time.perf_counter() - started:.0f} s")
        (top / READY_MARKER).write_text("")
        time.sleep(RACY_NS / 1e9 + 0.1)  # hashes of files changed within 2 s are never cached
        batch_manifest(scan_batch(root, batch))  # registration, as when the batch lands
    return batch


def run_sampled(cmd: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """Wall seconds, peak RSS of the process tree (sum) and of its largest process, sampled every 50 ms."""
    started = time.perf_counter()
    proc = psutil.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_tree = peak_one = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_tree, peak_one
        while not done.is_set():
            try:
                rss = [p.memory_info().rss for p in [proc, *proc.children(recursive=True)]]
            except psutil.Error:
                rss = []
            peak_tree, peak_one = max(peak_tree, sum(rss)), max([peak_one, *rss])
            done.wait(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {stderr.decode()[-2000:]}")
    return seconds, peak_tree, peak_one


def growth(args: argparse.Namespace) -> None:
    sizes = sorted(int(s) for s in args.sizes.split(","))
    w, h = (int(v) for v in args.size.lower().split("x"))
    workdir = args.workdir.resolve()
    batch = ensure_growth_batch(workdir, sizes[-1], (w, h))
    env = build_env(workdir)
    # the first command on a new Dagster instance creates its storage: not part of any build's cost
    warm_up = "from lora_pipeline.runs.instance import instance; i = instance(); i.get_runs(limit=1); " \
              "i.get_dynamic_partitions('dataset_versions')"
    subprocess.run([sys.executable, "-c", warm_up], env=env, check=True)
    print(f"growth: fresh `lora-pipeline build` over the first N of {sizes[-1]} JPEGs {w}x{h} q90 with sidecars")
    print(f"{'images':>8} {'seconds':>8} {'images/s':>9} {'ms/image':>9} {'peak RSS tree':>14} "
          f"{'largest process':>16}  load average before / after")
    rows = []
    for n in sizes:
        version = fresh_version(workdir / "data", f"growth-{n}")
        write_spec(workdir / "data", version, batch, include=None if n == sizes[-1] else _first(n))
        before = load()
        seconds, tree, one = run_sampled([str(CLI), "build", version, "--json"], env)
        rows.append((n, seconds))
        print(f"{n:>8} {seconds:>8.1f} {n / seconds:>9.0f} {1000 * seconds / n:>9.2f} {tree / 2**20:>10.0f} MiB "
              f"{one / 2**20:>12.0f} MiB  {before} / {load()}", flush=True)
    for (n0, t0), (n1, t1) in zip(rows, rows[1:], strict=False):
        print(f"per-image time {n1} vs {n0}: {(t1 / n1) / (t0 / n0):.2f}x; "
              f"marginal {1000 * (t1 - t0) / (n1 - n0):.2f} ms/image")


def _first(n: int) -> str:
    """A glob over img_00000.jpg.. that selects exactly the first n files (n a multiple of 1000)."""
    if n % 1000:
        raise SystemExit("--sizes must be multiples of 1000")
    thousands = n // 1000
    if thousands <= 10:
        return f"img_0[0-{thousands - 1}]*.jpg"
    raise SystemExit("sizes below the largest must be at most 10000")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        timed_child(argv[1])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["split", "growth"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lora-pipeline-snapshot-bench"))
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="1000,5000,20000")
    parser.add_argument("--size", default="640x512")
    parser.add_argument("--before", type=Path, help="split: also time this checkout of the code (PYTHONPATH)")
    args = parser.parse_args(argv)
    split(args) if args.mode == "split" else growth(args)


if __name__ == "__main__":
    main()
