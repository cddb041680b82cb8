"""The GPU end-to-end drill: full-size random SD 1.5, SDXL and FLUX.1 models through the real Dagster assets and MLflow.

    python3 benchmarks/gpu_e2e.py [--models sd15,sdxl|flux1] [--images 200 (100 with flux1)] [--sd15-epochs 20]
        [--sdxl-epochs 2] [--flux-epochs 1] [--root DIR] [--json PATH] [--smoke]

In one process, offline: writes SD 1.5-, SDXL- or FLUX.1 [dev]-shaped full-size base models with random weights
as diffusers folders (core/models/fullsize.py; loaded by the trainer through loading.py like any local checkpoint),
generates `--images` images of real sizes in mixed aspect ratios with trigger-first captions, takes them in
(`intake`), builds a dataset version through the `build_dataset_job` (spec, snapshot, captions, report),
materializes `lora_epochs` and `evaluation_grid` for one recipe per model through Dagster with MLflow on
SQLite, then checks the outputs: every epoch file converts through diffusers' kohya loader (a FLUX.1 file is
loaded by FluxPipeline's `load_lora_weights` into a FluxTransformer2DModel of the model's shape), the MLflow run
finished with one loss per step and every epoch file as an artifact, the provenance chain is ok. Then a
second process trains the first model again for one epoch under another recipe name, to show what the
persistent compile cache leaves of the warm-up (not for FLUX.1: see SECOND_RUN_SKIPPED). It prints the
wall-time split per model (load, latent caching, text encoding, the warm-up of all batch shapes ahead of the
epochs, training steps, first steps per bucket shape, saving on the training thread and the background writer's
time, the rest of the training asset, evaluation, the checks), images/s of the whole training asset and of its
steps, and peak GPU memory.

--smoke runs the same chain on CPU with the tiny models (test-sized: a dozen small images, 2 epochs; FLUX.1:
tiny-flux, 1 epoch, its double-stream blocks only, since diffusers' converter assumes FLUX.1's full widths for a
single block's linear1).

FLUX.1 [dev] fits one H100 in a few minutes (batch 1 at 1024 px, rank 16, AdamW, fp8 base weights, gradient
checkpointing: about 1.1 s a step and 15 GiB): 31 s to write the 34 GB model, about 10 s for the sha256 of its 24 GB
transformer (once, by the trainer's base_model_hash; the asset's and the drill's provenance checks find it in
data/.cache/models/), 100 steps, and the evaluation of 1 prompt at 8 steps with the whole pipeline in bf16 on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from lora_pipeline.core.paths import DataRoot

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by a test alike
from gpu_e2e_checks import check_outputs  # noqa: E402
from gpu_e2e_inputs import BATCH, FULL_SIZES, SMOKE_SIZES, VERSION, generate_images, recipe, write_spec  # noqa: E402

FAST_PATH = {"auto": None, "on": True, "off": False}  # auto: the recipe leaves it unset
SMOKE_BASES = {"sd15": "tiny-sd", "sdxl": "tiny-sdxl", "flux1": "tiny-flux"}
DEFAULT_IMAGES = {"sd15": 200, "sdxl": 200, "flux1": 100}  # the fewest of the drilled models' counts
# Why the second process is not run when the first model is this family.
SECOND_RUN_SKIPPED = {
    "flux1": "it would reload and hash the 34 GB model and train 100 steps again (minutes), and FLUX.1's "
             "drill recipe checkpoints its blocks (the eager step: nothing captured), so there is no compile cache "
             "to show",
}


def _peak_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak



def drill_model(root: DataRoot, family: str, base_model: str, epochs: int, smoke: bool, fast_path: bool | None,
                checkpointing: bool = False) -> dict[str, Any]:
    from lora_pipeline.cli_jobs import evaluate_version, train_version

    name = f"drill-{family}"
    root.recipe_file(name).write_text(yaml.safe_dump(recipe(name, family, base_model, epochs, smoke, fast_path,
                                                                 checkpointing)),
                                      encoding="utf-8")
    started = time.perf_counter()
    trained = train_version(root, VERSION, name, quiet=True)
    train_seconds = time.perf_counter() - started
    print(f"{name}: lora_epochs asset {train_seconds:.1f} s, {trained['timings']}", flush=True)
    train_peak = _peak_gib()
    started = time.perf_counter()
    evaluated = evaluate_version(root, VERSION, name, quiet=True)
    eval_seconds = time.perf_counter() - started
    print(f"{name}: evaluation_grid asset {eval_seconds:.1f} s, {evaluated['timings']}", flush=True)
    timings = trained["timings"]
    images = trained["images_trained"]
    steady = timings["training_steps"] - timings["shape_warmup"]
    return {
        "family": family, "recipe": name, "epochs": epochs, "images_trained": images,
        "fast_path": trained["fast_path"], "timings": timings, "train_asset_seconds": train_seconds,
        "evaluation_seconds": eval_seconds, "evaluation_timings": evaluated["timings"],
        "images_per_second_whole_asset": images / train_seconds,
        "images_per_second_steps": images / timings["training_steps"],
        "images_per_second_steps_after_warmup": images / steady if steady > 0 else None,
        "peak_gpu_gib_training": train_peak, "peak_gpu_gib_evaluation": _peak_gib(),
        "checks": check_outputs(root, family, base_model, trained),
    }


def retrain(root: DataRoot, family: str) -> dict[str, Any]:
    """Train the drill recipe again for one epoch under a new name (new outputs, same model and buckets)."""
    from lora_pipeline.cli_jobs import train_version

    source = yaml.safe_load(root.recipe_file(f"drill-{family}").read_text(encoding="utf-8"))
    name = f"drill-{family}-again"
    root.recipe_file(name).write_text(yaml.safe_dump({**source, "name": name, "epochs": 1}), encoding="utf-8")
    trained = train_version(root, VERSION, name, quiet=True)
    return {"family": family, "recipe": name, "timings": trained["timings"]}


def _environment(root: Path) -> None:
    """The drill's settings. Its Dagster home gets the repository's dagster.yaml (telemetry off) before anything
    opens an instance: without it every process opening one warned "No dagster instance configuration file" and
    printed Dagster's telemetry banner."""
    from lora_pipeline.runs.instance import ensure_dagster_home

    os.environ["LORA_PIPELINE_DATA"] = str(root)
    os.environ["DAGSTER_HOME"] = str(root / ".dagster_home")
    ensure_dagster_home()
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("DO_NOT_TRACK", "1"),
                       ("MLFLOW_ENABLE_TELEMETRY", "false"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(key, value)


def _stage_done(stages: dict[str, float], stage: str, started: float) -> None:
    """Record a setup stage's seconds and print them at once (a run cut off by a time limit still shows them)."""
    stages[stage] = time.perf_counter() - started
    print(f"{stage}: {stages[stage]:.1f} s", flush=True)


def run_drill(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lora_pipeline.cli_jobs import build_version, cmd_intake
    from lora_pipeline.core.models.fullsize import write_fullsize_model

    root = DataRoot(Path(args.root))
    for folder in (root.specs, root.recipes, root.models):
        folder.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                              "torch": torch.__version__, "stages": {}, "models": []}
    stages = report["stages"]
    started = time.perf_counter()
    bases = {}
    for family in args.models:
        if args.smoke:
            bases[family] = SMOKE_BASES[family]
        else:
            bases[family] = f"random-{family}"
            write_fullsize_model(family, root.models / bases[family], "cuda", seed=len(bases))
            torch.cuda.empty_cache()
    _stage_done(stages, "generate_models", started)
    started = time.perf_counter()
    handoff = Path(args.root) / "handoff"
    generate_images(handoff, args.images, SMOKE_SIZES if args.smoke else FULL_SIZES)
    _stage_done(stages, "generate_images", started)
    started = time.perf_counter()
    cmd_intake(argparse.Namespace(src_dir=str(handoff), batch=BATCH, json=True, rights="owned", licence=None,
                                   holder=None), root)
    write_spec(root, 32 if args.smoke else 512)
    built = build_version(root, VERSION, quiet=True)
    _stage_done(stages, "intake_and_build", started)
    report["dataset"] = {"version": VERSION, "images": built["counts"], "errors": built["errors"],
                         "warnings": built["warnings"]}
    if built["errors"]:
        raise RuntimeError(f"the drill's dataset has blocking problems: {built}")
    epochs = {"sd15": args.sd15_epochs, "sdxl": args.sdxl_epochs, "flux1": args.flux_epochs}
    for family in args.models:
        _peak_gib()
        report["models"].append(drill_model(root, family, bases[family], epochs[family], args.smoke,
                                              FAST_PATH[args.fast_path], args.gradient_checkpointing))
        print(json.dumps(report["models"][-1]), flush=True)
    if args.models and args.models[0] in SECOND_RUN_SKIPPED:
        report["second_run_skipped"] = f"no second run of {args.models[0]}: {SECOND_RUN_SKIPPED[args.models[0]]}"
    elif args.models and not args.no_second_run:
        started = time.perf_counter()
        again = subprocess.run([sys.executable, __file__, "--retrain", args.models[0], "--root", str(args.root)],
                               capture_output=True, text=True, check=True)
        report["second_run"] = {**json.loads(again.stdout.strip().splitlines()[-1]),
                                "process_seconds": time.perf_counter() - started}
    return report




def _parts(timings: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.1f} s" for name, value in timings.items())


def _rest(m: dict[str, Any], timed: float) -> str:
    """The rest of the asset by part; 'dagster' is what none of them holds (the run's own events and steps)."""
    from lora_pipeline.core.training.run.epochs import HOST_STAGES  # the training stack: imported when printing

    t = m["timings"]
    rest = ("asset_setup", *HOST_STAGES, "provenance_and_lineage")  # the trainer's host work and the asset's own
    parts = {name: t.get(name, 0.0) for name in rest}
    return _parts({**parts, "dagster": m["train_asset_seconds"] - timed - sum(parts.values())})


def print_report(report: dict[str, Any]) -> None:
    print(f"\ndrill on {report['device']} | torch {report['torch']} | dataset {report['dataset']}")
    print("setup: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["stages"].items()))
    for m in report["models"]:
        t = m["timings"]
        timed = sum(t.get(k, 0.0) for k in ("load", "latent_caching", "text_encoding", "warmup_ahead",
                                            "training_steps", "saving"))
        print(f"{m['family']}: {m['epochs']} epochs, {m['images_trained']} images, fast path "
              f"{'on' if m['fast_path'] else 'off'}\n  split: load {t['load']:.1f} s | latent caching "
              f"{t['latent_caching']:.1f} s (background {t.get('latent_caching_background', 0.0):.1f} s, "
              f"overlapped) | text encoding {t['text_encoding']:.1f} s | warm-up of all shapes "
              f"ahead {t.get('warmup_ahead', 0.0):.1f} s | training steps {t['training_steps']:.1f} s (first "
              f"steps per shape {t['shape_warmup']:.1f} s of it) | saving on the training thread "
              f"{t['saving']:.1f} s (background writer {t.get('saving_background', 0.0):.1f} s, overlapped) | "
              f"rest of the lora_epochs asset {m['train_asset_seconds'] - timed:.1f} s ({_rest(m, timed)}) | "
              f"evaluation {m['evaluation_seconds']:.1f} s ({_parts(m.get('evaluation_timings', {}))}) | "
              f"lora_epochs asset {m['train_asset_seconds']:.1f} s\n  images/s: whole asset "
              f"{m['images_per_second_whole_asset']:.2f} ("
              f"{m['images_per_second_whole_asset'] / m['images_per_second_steps']:.1%} of the steps' speed)"
              f" | steps {m['images_per_second_steps']:.2f} | steps after warm-up "
              f"{m['images_per_second_steps_after_warmup'] or 0:.2f} | time to first step "
              f"{t.get('time_to_first_step', 0):.1f} s | peak GPU memory training "
              f"{m['peak_gpu_gib_training'] or 0:.1f} GiB, evaluation {m['peak_gpu_gib_evaluation'] or 0:.1f} GiB"
              f"\n  checks: {m['checks']}")
    if "second_run" in report:
        s = report["second_run"]
        print(f"second run of {s['family']} (new process, 1 epoch): time to first step "
              f"{s['timings'].get('time_to_first_step', 0):.1f} s, warm-up ahead "
              f"{s['timings'].get('warmup_ahead', 0.0):.1f} s, first steps per shape "
              f"{s['timings']['shape_warmup']:.1f} s, whole process {s['process_seconds']:.1f} s")
    if "second_run_skipped" in report:
        print(report["second_run_skipped"])
    print(f"whole drill {report['seconds']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--images", type=int, default=None,
                        help=f"images of the dataset (default: the fewest of {DEFAULT_IMAGES} for the models)")
    parser.add_argument("--sd15-epochs", type=int, default=20)
    parser.add_argument("--sdxl-epochs", type=int, default=2)
    parser.add_argument("--flux-epochs", type=int, default=1)
    parser.add_argument("--fast-path", choices=tuple(FAST_PATH), default="auto",
                        help="the recipes' fast_path (auto: unset, so on where it can be)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="the SD 1.5 and SDXL recipes with gradient checkpointing (the eager step)")
    parser.add_argument("--root", default=None, help="data root to create (default: a new temporary folder)")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU, 12 images, 2 epochs (FLUX.1: 1)")
    parser.add_argument("--no-second-run", action="store_true", help="skip the one-epoch retraining process")
    parser.add_argument("--retrain", default=None, help=argparse.SUPPRESS)  # the second-run child process
    args = parser.parse_args(argv)
    args.root = args.root or tempfile.mkdtemp(prefix="gpu-e2e-")
    _environment(Path(args.root))
    if args.retrain:
        print(json.dumps(retrain(DataRoot(Path(args.root)), args.retrain)))
        return 0
    args.models = [m for m in args.models.split(",") if m]
    if args.images is None:
        args.images = min(DEFAULT_IMAGES[m] for m in args.models)
    if args.smoke:
        args.images, args.sd15_epochs, args.sdxl_epochs, args.flux_epochs = 12, 2, 2, 1
    started = time.perf_counter()
    report = run_drill(args)
    report["seconds"] = time.perf_counter() - started
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
