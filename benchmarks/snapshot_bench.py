"""Snapshot and whole-build cost against a plain `cp -r` on 1,000 ~1-megapixel JPEGs.

Targets: snapshot <= 1.3x cp -r; the whole `lora-pipeline build` of a fresh version >= 150 images/s.

    .venv/bin/python benchmarks/snapshot_bench.py [--workdir DIR] [--count 1000] [--runs 5] [--skip-build]

The batch is generated once (process pool) and kept in the work dir. The page cache is warm (the
batch is read again before every run, see `read_all`) and pending writes are flushed (`sync`) before
each run, so one run's writeback does not land in the next. Every timing is the best of `--runs` (all
are printed), the three contenders interleaved so that a busy moment hits all of them alike:

  cp -r            the same files, the same filesystem
  snapshot, warm   the pipeline's normal case: the batch was registered (hashed, `batch_manifest`) when it
                   landed, so every file whose stat still matches is copied in the kernel, unread
  snapshot, cold   hash cache deleted first: every byte is read, hashed and written (and the cache rebuilt)
  whole build      `lora-pipeline build` of a fresh version (a new spec each run) over the same JPEGs with a
                   sidecar caption each (batch `bench-captioned`, registered), as a subprocess: interpreter
                   start, Dagster run, snapshot, captions, validation, report, contact sheet, seal, metadata;
                   beside it `cp -r` of that captioned batch

Both snapshots write manifest.jsonl and snapshot.json (fsynced) and rename the staging folder into place.
Outputs of the timed runs are renamed aside and deleted only at the end: on ext4 without a journal (as
here), inode allocation skips inodes freed in the last ~30 s (`recently_deleted`), so right after deleting
the previous run's 1,000 files each create cost ~0.3 ms, for cp -r and snapshot alike.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from lora_pipeline.core.datasets.snapshot.snapshot import SnapshotResult, build_snapshot
from lora_pipeline.core.datasets.sources.batches import batch_manifest, scan_batch
from lora_pipeline.core.datasets.sources.hashcache import RACY_NS, cache_file
from lora_pipeline.core.datasets.spec import DatasetSpec, SourceRef
from lora_pipeline.core.paths import READY_MARKER, DataRoot

SIZE = (1152, 896)  # ~1.03 megapixels
QUALITY = 90
BATCH = "bench-batch"


def make_jpeg(args: tuple[Path, int]) -> int:
    """Gradients plus seeded noise: photo-like entropy, so the JPEG size is realistic (~0.3-0.5 MB)."""
    path, seed = args
    rng = np.random.default_rng(seed)
    w, h = SIZE
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    phase = rng.uniform(0, 6.28, 3)
    channels = [128 + 100 * np.sin(6 * x * (c + 1) + 4 * y + phase[c]) for c in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 14, (h, w, 3))
    tmp = path.with_suffix(".part")
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(tmp, "JPEG", quality=QUALITY)
    os.replace(tmp, path)
    return path.stat().st_size


def ensure_batch(root: DataRoot, count: int) -> Path:
    """The generated batch, reused when a previous run made the same one."""
    top = root.batch(BATCH)
    stamp = f"{count} {SIZE} q{QUALITY}\n"
    if (top / READY_MARKER).is_file() and (top / READY_MARKER).read_text() == stamp:
        return top
    top.mkdir(parents=True, exist_ok=True)
    (top / READY_MARKER).unlink(missing_ok=True)
    jobs = [(top / f"img_{i:04d}.jpg", i) for i in range(count) if not (top / f"img_{i:04d}.jpg").exists()]
    started = time.perf_counter()
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(make_jpeg, jobs, chunksize=8))
    print(f"generated {len(jobs)} JPEGs in {time.perf_counter() - started:.1f} s")
    (top / READY_MARKER).write_text(stamp)
    # A file hashed within 2 s of its last change is "racy" and never cached; a real batch is registered
    # after it landed, so wait that long before registering it.
    time.sleep(RACY_NS / 1e9 + 0.1)
    return top


CAPTIONED = "bench-captioned"


def ensure_captioned_batch(root: DataRoot, count: int) -> str:
    """The batch again with a sidecar caption per image (the JPEGs hard-linked: sources are only read), for
    the whole `lora-pipeline build`; registered (hashed) like a batch that has landed."""
    images = sorted(ensure_batch(root, count).glob("*.jpg"))
    top = root.batch(CAPTIONED)
    stamp = f"{count} {SIZE} q{QUALITY} captioned\n"
    if (top / READY_MARKER).is_file() and (top / READY_MARKER).read_text() == stamp:
        return CAPTIONED
    shutil.rmtree(top, ignore_errors=True)
    top.mkdir(parents=True)
    for i, image in enumerate(images):
        os.link(image, top / image.name)
        (top / image.name).with_suffix(".txt").write_text(f"bench, gradient study {i}, seed {i % 97}\n")
    (top / READY_MARKER).write_text(stamp)
    time.sleep(RACY_NS / 1e9 + 0.1)
    batch_manifest(scan_batch(root, CAPTIONED))
    return CAPTIONED


CLI = Path(sys.executable).with_name("lora-pipeline")
BUILD_TARGET = 150  # images/s for the whole build (issue 14)


def write_spec(root: Path, version: str, batch: str, include: str | None = None) -> None:
    """specs/<version>.yaml over one batch with sidecar captions (`include`: a glob over its files)."""
    lines = [f"name: {version}", "trigger: bench", "repeats: 1", "sources:", f"  - batch: {batch}"]
    if include:
        lines.append(f"    include: ['{include}']")
    lines += ["captions:", "  from: sidecar"]
    (root / "specs").mkdir(parents=True, exist_ok=True)
    (root / "specs" / f"{version}.yaml").write_text("\n".join(lines) + "\n")


def build_env(workdir: Path) -> dict[str, str]:
    """The data root and a Dagster instance of the work dir, for `lora-pipeline` subprocesses."""
    home = workdir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "LORA_PIPELINE_DATA": str(workdir / "data"), "DAGSTER_HOME": str(home)}


def fresh_version(root: Path, prefix: str) -> str:
    """A version name no spec of the data root has yet."""
    n = 1
    while (root / "specs" / f"{prefix}-{n}.yaml").exists():
        n += 1
    return f"{prefix}-{n}"


Contender = tuple[Callable[[], None], Callable[[], object]]  # (prepare, timed work)


def run_times(runs: int, contenders: dict[str, Contender]) -> dict[str, list[float]]:
    """Wall times of each (prepare, work) contender, sorted; runs interleave so a busy moment hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, (prepare, work) in contenders.items():
            prepare()
            os.sync()
            started = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - started)
    return {name: sorted(values) for name, values in times.items()}


def read_all(paths: list[Path]) -> None:
    """Bring files into the page cache (see drop_from_page_cache for why before every run)."""
    for path in paths:
        path.read_bytes()


def drop_from_page_cache(folder: Path) -> None:
    """Evict a finished run's (synced, clean) output from the page cache.

    This VM's kernel pages out memory that DAMON samples as idle for ~30 s (a `pageout` scheme, up to
    2 GB/s). With each run's 422 MB of output left in the cache, it started paging out whole physical
    regions after a few runs, the batch's pages with them, and later runs read from disk (cp -r took
    1.1 s instead of 0.14 s). Keeping the cache to the batch alone keeps every run warm.
    """
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def filesystem_type(path: Path) -> str:
    """fstype of the mount holding `path` (longest matching mount point in /proc/self/mounts)."""
    real, best = os.path.realpath(path), ("", "unknown")
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            _, point, fstype, *_ = line.split()
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
                best = (point, fstype)
    return best[1]


def cpu_model() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def time_validation(paths: list[Path], workers: int = 2) -> str:
    from lora_pipeline.core.datasets.checks.inspection import inspect_images  # here: build_bench --before runs old code

    started = time.perf_counter()
    infos = inspect_images(paths, max_pixels=64_000_000, workers=workers)
    elapsed = time.perf_counter() - started
    megapixels = sum(SIZE[0] * SIZE[1] for _ in infos) / 1e6
    return (
        f"validation (core.datasets.inspection.inspect_images, full decode + hashes, {workers} workers, 1 run): "
        f"{elapsed:.2f} s = {len(infos) / elapsed:.0f} images/s, {megapixels / elapsed:.0f} MP/s"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lora-pipeline-snapshot-bench")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-validation", action="store_true")
    parser.add_argument("--skip-build", action="store_true", help="leave out the whole-build rows")
    args = parser.parse_args(argv)

    root = DataRoot(args.workdir.resolve() / "data")
    batch = ensure_batch(root, args.count)
    # before the registration below: hard-linking the JPEGs changes their ctime, which voids hash-cache entries
    captioned = None if args.skip_build else root.batch(ensure_captioned_batch(root, args.count))
    images = sorted(batch.glob("*.jpg"))
    total = sum(p.stat().st_size for p in images)
    read_all(images)

    started = time.perf_counter()
    registered = batch_manifest(scan_batch(root, BATCH))  # what the source_batch asset does when a batch lands
    t_register = time.perf_counter() - started

    cp_dest = args.workdir / "cp-copy"
    spec = DatasetSpec(name="bench-v1", trigger="bench", repeats=1, sources=(SourceRef(batch=BATCH),))
    results: dict[str, SnapshotResult] = {}
    aside, numbers = args.workdir / "aside", itertools.count()
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()

    built: list[str] = []
    env = build_env(args.workdir.resolve())

    def clean() -> None:
        for path in (cp_dest, root.dataset(spec.name), *(root.dataset(v) for v in built)):
            if path.exists():
                moved = aside / str(next(numbers))
                os.rename(path, moved)
                os.sync()
                drop_from_page_cache(moved)
        read_all(images)

    def clean_build() -> None:
        clean()
        read_all(sorted(captioned.iterdir()) if captioned else [])
        built.append(fresh_version(root.root, "bench-build"))
        write_spec(root.root, built[-1], CAPTIONED)

    def whole_build() -> None:
        subprocess.run([str(CLI), "build", built[-1], "--json"], env=env, check=True, stdout=subprocess.DEVNULL)

    def clean_cold() -> None:
        clean()
        cache_file(root, BATCH).unlink(missing_ok=True)

    def snapshot(name: str) -> Callable[[], None]:
        def run() -> None:
            results[name] = build_snapshot(root, spec, "bench")

        return run

    contenders: dict[str, Contender] = {}
    if captioned:  # first in each round: the validation below reads the last round's cold snapshot
        contenders["cp_captioned"] = (clean, lambda: subprocess.run(["cp", "-r", str(captioned), str(cp_dest)],
                                                                     check=True))
        contenders["build"] = (clean_build, whole_build)
    contenders |= {
        "cp": (clean, lambda: subprocess.run(["cp", "-r", str(batch), str(cp_dest)], check=True)),
        "warm": (clean, snapshot("warm")),
        "cold": (clean_cold, snapshot("cold")),
    }
    load_before = os.getloadavg()
    times = run_times(args.runs, contenders)
    load_after = os.getloadavg()
    best = {name: values[0] for name, values in times.items()}
    t_cp, warm, cold = best["cp"], results["warm"], results["cold"]

    def line(label: str, name: str, result: SnapshotResult | None = None) -> str:
        seconds = best[name]
        text = f"{label:<16}{seconds:.3f} s  {total / seconds / 1e6:5.0f} MB/s  {seconds / t_cp:.2f}x cp -r"
        text += f"  (all runs: {' '.join(f'{t:.3f}' for t in times[name])})"
        if result is not None:
            text += f"\n{'':16}hashed {result.hashed} of {len(result.rows)} files; methods {result.copy_methods}"
        return text

    print(f"date:           {datetime.now(UTC).isoformat(timespec='seconds')}")
    print(f"command:        {sys.executable} {' '.join(sys.argv)}")
    print(f"machine:        {os.cpu_count()} cores, {cpu_model()}, {platform.system()} {platform.release()}, "
          f"python {platform.python_version()}")
    print(f"filesystem:     {filesystem_type(args.workdir)} ({args.workdir})")
    print(f"load average:   {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} before, "
          f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} after the timed runs (1/5/15 min)")
    print(f"batch:          {len(images)} JPEGs {SIZE[0]}x{SIZE[1]} q{QUALITY}, {total / 1e6:.0f} MB")
    print(f"page cache:     warm (batch read before every run); best of {args.runs}, interleaved")
    print(f"registration:   {t_register:.3f} s (batch_manifest: sha256 + image header of {len(registered)} files, "
          f"hash cache written)")
    print(line("cp -r:", "cp"))
    print(line("snapshot warm:", "warm", warm))
    print(line("snapshot cold:", "cold", cold))
    ratio = best["warm"] / t_cp
    print(f"target:         warm snapshot <= 1.3x cp -r: {'met' if ratio <= 1.3 else 'NOT met'} ({ratio:.2f}x)")
    if captioned:
        print(line("cp -r captioned:", "cp_captioned") + "  (the JPEGs and 1 caption file each)")
        t_build = best["build"]
        rate = len(images) / t_build
        print(f"{'whole build:':<16}{t_build:.3f} s  {rate:5.0f} images/s  {t_build / best['cp_captioned']:.1f}x "
              f"cp -r captioned  (all runs: {' '.join(f'{t:.3f}' for t in times['build'])})")
        print(f"target:         whole build >= {BUILD_TARGET} images/s: "
              f"{'met' if rate >= BUILD_TARGET else 'NOT met'} ({rate:.0f} images/s, best of {args.runs})")
    assert warm.image_root == cold.image_root, "warm and cold snapshots differ"
    if not args.skip_validation:
        written = [cold.dir / r.path for r in cold.rows]
        read_all(written)
        print(time_validation(written))
    clean()
    shutil.rmtree(aside)


if __name__ == "__main__":
    main()
