"""benchmarks/train_throughput.py --smoke: the benchmark runs the trainer's step and counts real FLOPs."""

from __future__ import annotations

import importlib.util
import json
import sys

from lora_pipeline.core.paths import REPO_ROOT


def _benchmark():
    path = REPO_ROOT / "benchmarks" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def test_smoke_run_reports_throughput_and_mfu_for_both_models(capsys):
    benchmark = _benchmark()
    assert benchmark.main(["--smoke", "--model", "both", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["peak_tflops"] == 989 and report["torch"] and report["command"].endswith("--device cpu")
    by_model = {r["model"]: r for r in report["results"]}
    assert set(by_model) == {"sd15", "sdxl"}
    for result in by_model.values():
        assert result["steps"] == 2 and result["batch"] == 2 and result["rank"] == 4
        assert result["images_per_second"] > 0 and result["step_ms"] > 0
        assert result["flops_per_step"] > 1e7  # counted by FlopCounterMode, forward and backward
        assert 0 < result["mfu"] < 1 and result["lora_params"] > 0


def test_text_report_names_the_peak_and_gradient_checkpointing(capsys):
    benchmark = _benchmark()
    args = ["--smoke", "--model", "sd15", "--gradient-checkpointing", "--peak-tflops", "100", "--device", "cpu"]
    assert benchmark.main(args) == 0
    out = capsys.readouterr().out
    assert "MFU against 100 TFLOP/s (--peak-tflops)" in out
    assert "gradient checkpointing on" in out and "images/s" in out and "MFU" in out
