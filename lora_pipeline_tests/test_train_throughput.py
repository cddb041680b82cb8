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


def test_smoke_run_reports_throughput_mfu_and_the_ratio_to_the_reference_step(capsys):
    benchmark = _benchmark()
    argv = ["--smoke", "--model", "both", "--variants", "reference,plain", "--json", "--device", "cpu"]
    assert benchmark.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["peak_tflops"] == 989 and report["torch"] and report["command"].endswith("--device cpu")
    by_run = {(r["model"], r["variant"]): r for r in report["results"]}
    assert set(by_run) == {(m, v) for m in ("sd15", "sdxl") for v in ("reference", "plain")}
    for (_, variant), result in by_run.items():
        assert result["steps"] == 2 and result["batch"] == 2 and result["rank"] == 4
        assert result["images_per_second"] > 0 and result["step_ms"] > 0
        assert result["vs_reference"] > 0
        if variant == "plain":
            assert result["flops_per_step"] > 1e7  # counted by FlopCounterMode, forward and backward
            assert 0 < result["mfu"] < 1
    assert by_run[("sd15", "reference")]["vs_reference"] == 1.0


def test_text_report_of_the_fast_variant_names_the_peak_checkpointing_and_the_profile(capsys):
    benchmark = _benchmark()
    args = ["--smoke", "--model", "sd15", "--variants", "fast",
            "--gradient-checkpointing", "--peak-tflops", "100", "--profile", "1", "--device", "cpu"]
    assert benchmark.main(args) == 0
    out = capsys.readouterr().out
    assert "MFU against 100 TFLOP/s (--peak-tflops)" in out
    assert "sd15 fast:" in out and "gradient checkpointing on" in out and "images/s" in out and "MFU" in out
    assert "profile sd15 fast" in out and "Self CPU" in out


def test_flux_smoke_run_times_the_reference_and_the_trainer_step_with_the_memory_options(capsys):
    benchmark = _benchmark()
    argv = ["--smoke", "--model", "flux1", "--variants", "reference,plain,fast", "--json", "--device", "cpu",
            "--fp8-base", "--blocks-to-swap", "2", "--gradient-checkpointing"]
    assert benchmark.main(argv) == 0
    captured = capsys.readouterr()
    by_variant = {r["variant"]: r for r in json.loads(captured.out)["results"]}
    assert set(by_variant) == {"reference", "plain"}  # the fast path refuses block swap, and says so
    assert "flux1 fast: not run: blocks_to_swap copies block weights" in captured.err
    plain = by_variant["plain"]
    assert plain["fp8_base"] and plain["blocks_to_swap"] == 2 and plain["gradient_checkpointing"]
    assert plain["flops_per_step"] > 1e6 and plain["vs_reference"] > 0 and plain["batch"] == 1
    assert by_variant["reference"]["optimizer"] == "AdamW" and not by_variant["reference"]["fp8_base"]


def test_flux_fast_variant_replays_the_rectified_flow_step(capsys):
    benchmark = _benchmark()
    argv = ["--smoke", "--model", "flux1", "--variants", "plain,fast", "--json", "--device", "cpu",
            "--steps", "2", "--warmup", "2"]
    assert benchmark.main(argv) == 0
    by_variant = {r["variant"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert set(by_variant) == {"plain", "fast"}
    # the same steps from the same seeds and LoRA init: on a CPU the recorded step is called again, so the losses
    # agree bit for bit (fast-compiled is run on the device only: inductor's warm-up takes a minute on this CPU)
    assert by_variant["fast"]["final_loss"] == by_variant["plain"]["final_loss"]


def test_options_smoke_run_times_each_option_plain_and_fast_beside_the_reference(capsys):
    benchmark = _benchmark()
    argv = ["--smoke", "--model", "sd15", "--options", "te-lora,adamw8bit,accumulation", "--json", "--device", "cpu"]
    assert benchmark.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    by_run = {(r["option"], r["variant"]): r for r in rows}
    assert set(by_run) == {(None, "reference")} | {(o, v) for o in ("te-lora", "adamw8bit", "accumulation")
                                                   for v in ("plain", "fast")}
    assert by_run[("adamw8bit", "fast")]["optimizer"] == "AdamW8bit"
    assert by_run[("adamw8bit", "fast")]["captured"] == "forward/backward (optimizer after the replay)"
    assert by_run[("te-lora", "fast")]["captured"] == "yes" and by_run[("te-lora", "plain")]["captured"] == "no (eager)"
    for option in ("te-lora", "adamw8bit", "accumulation"):
        plain, fast = by_run[(option, "plain")], by_run[(option, "fast")]
        assert plain["images_per_second"] > 0 and fast["images_per_second"] > 0
        # the same steps from the same seeds and LoRA init; on a CPU the recording is called again: equal losses
        assert fast["final_loss"] == plain["final_loss"]
    assert by_run[("te-lora", "plain")]["final_loss"] != by_run[("adamw8bit", "plain")]["final_loss"]
    table = benchmark.train_options.options_table(rows)
    assert "| sd15 | te-lora |" in table and "x) |" in table  # each step's ratio to the reference


def test_the_fused_lora_layers_count_the_flops_of_peft_ones(capsys):
    """The fused layers' base matmuls are in-place `addmm_`, which torch's FlopCounterMode skips unless told: the
    same model counts the same FLOPs either way, so the MFU of the two is comparable."""
    benchmark = _benchmark()
    flops = []
    for extra in ([], ["--unfused-lora"]):
        assert benchmark.main(["--smoke", "--model", "sd15", "--variants", "plain", "--json", "--device", "cpu",
                               *extra]) == 0
        flops.append(json.loads(capsys.readouterr().out)["results"][0]["flops_per_step"])
    assert flops[0] == flops[1] > 1e7


def test_lora_layer_benchmark_times_peft_and_the_fused_layer(capsys):
    path = REPO_ROOT / "benchmarks" / "lora_layer.py"
    spec = importlib.util.spec_from_file_location("lora_layer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--smoke"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if " tokens, " in line]
    assert len(rows) == len(module.SMOKE_SHAPES) and all("peft " in r and "fused " in r for r in rows)
