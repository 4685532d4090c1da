"""The benchmarks: their arithmetic (percentiles, windows, the pixel budget rule) and the GPU script's smoke run."""

from __future__ import annotations

import json
import shutil

import pytest

from bench.compare import choose_pixel_budget
from bench.load import Run, Sample, Shape, parse_shapes, percentile, summarize
from tests.unit.preview_goldens import GOLDEN_DIR, GOLDENS, KERNEL_NOISE, RESIDUAL, load_golden, needs_goldens


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (50.0, 95.0, 99.0)
    assert percentile([3.0], 99) == 3.0 and percentile([], 50) is None


def test_only_requests_finishing_inside_the_window_count():
    shapes = parse_shapes("64x64x1,128x128x2")
    samples = [Sample("64x64x1", 0.0, 0.5, 200, 1),   # warm-up: not counted
               Sample("64x64x1", 0.5, 1.5, 200, 1),
               Sample("128x128x2", 1.0, 2.5, 200, 2),
               Sample("128x128x2", 2.0, 2.9, 503, 0),
               Sample("64x64x1", 2.5, 3.5, 200, 1)]   # after the window: not counted
    summary = summarize([Run(samples, (1.0, 3.0))], shapes, clients=2)
    assert summary["images"] == 3 and summary["images_per_s"] == 1.5
    assert summary["errors"] == {"503": 1}
    assert summary["by_shape"]["128x128x2"]["images"] == 2
    assert Shape.parse("512x256x8") == Shape(512, 256, 8)


def test_the_budget_is_the_largest_call_size_with_no_loss_at_or_below_it():
    rows = [{"call_pixels": 2 * 128 * 128, "per_image_ratio": 0.8},
            {"call_pixels": 4 * 256 * 256, "per_image_ratio": 1.01},
            {"call_pixels": 2 * 512 * 512, "per_image_ratio": 1.15},
            {"call_pixels": 8 * 256 * 256, "per_image_ratio": 1.0}]  # as large as a losing call: out
    assert choose_pixel_budget(rows, tolerance=1.02) == 4 * 256 * 256
    assert choose_pixel_budget(rows, tolerance=1.0) == 2 * 128 * 128


@pytest.mark.slow  # every phase of the benchmark, on the small model
def test_the_gpu_benchmark_runs_every_phase_in_smoke_mode(tmp_path):
    """`bench/flux_fast_gpu.py --smoke`: every phase on the small model, so the device script cannot rot.

    Dynamo's `eager` backend keeps this quick; test_fast_engine covers `aot_eager` (the smoke default).
    """
    import torch

    from bench import flux_fast_gpu

    threads = torch.get_num_threads()
    try:
        flux_fast_gpu.main(["--smoke", "--backend", "eager", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the smoke plan runs on one thread
    report = json.loads((tmp_path / "flux_fast_gpu.json").read_text())
    assert report["errors"] == {} and report["skipped"] == {}
    phases = report["phases"]
    assert phases["exact"]["s_per_image"] > 0 and phases["compiled"]["s_per_image"] > 0
    assert phases["fp8"]["s_per_image"] is None and "compute capability" in phases["fp8"]["reason"]
    assert report["recompiles_after_warmup"] == 0 and report["recompiles_new_shapes"] == 0
    assert report["slot_vs_peft_max_abs"] <= 1e-5 and report["swap_changes_image"]
    assert report["swap_s"] >= 0 and report["compile_s"] > 0 and "peak_gib" in report
    assert (tmp_path / "flux_fast_gpu.md").read_text().startswith("Device: cpu")


@needs_goldens
def test_the_golden_check_draws_every_golden_of_a_directory(tmp_path):
    """`bench/preview_goldens.py`: the check a machine with other CPU kernels runs (a device's host, say)."""
    from bench import preview_goldens

    goldens = tmp_path / "goldens"
    goldens.mkdir()
    golden = load_golden(GOLDENS[0])
    (goldens / f"{GOLDENS[0]}.json").write_text(json.dumps(golden))
    shutil.copy(GOLDEN_DIR / golden["expected_png"], goldens / golden["expected_png"])
    preview_goldens.main(["--goldens", str(goldens), "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out/preview_goldens.json").read_text())
    [(name, row)] = report["goldens"].items()
    assert name == GOLDENS[0] and row["max"] <= RESIDUAL.get(name, KERNEL_NOISE)[0]
    assert report["machine"]["versions"]["optimum-quanto"] and "avx512_bf16" in report["machine"]["cpu_flags"]
    assert f"| {name} | {row['max']} |" in (tmp_path / "out/preview_goldens.md").read_text()


def test_the_webhook_benchmark_times_deliveries_retries_and_a_hung_receiver(tmp_path):
    """`bench/webhooks.py`, small: every measurement runs, and the result files name the machine."""
    from bench import webhooks

    webhooks.main(["--jobs", "3", "--burst", "3", "--retry-runs", "1", "--batch", "2", "--hung", "1",
                   "--work-ms", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "webhooks.json").read_text())
    latency = report["latency"]
    assert latency["one_by_one"]["count"] == 3 and latency["one_by_one"]["attempts"] == [1]
    assert latency["burst"]["count"] == 3 and latency["one_by_one"]["min_ms"] > 0
    [retried] = report["retries"]
    assert retried["attempts"] == 3 and retried["gaps_s"][0] >= webhooks.BACKOFF_S
    assert retried["gaps_s"][1] >= 2 * webhooks.BACKOFF_S
    assert len(report["hung_receiver"]["batch_s_while_hung"]) == len(report["hung_receiver"]["batch_s_without"]) == 5
    assert report["machine"]["cpu"] and report["machine"]["cpus"]
    assert report["machine"]["cpu"] in (tmp_path / "webhooks.md").read_text()
