"""The CPU benchmarks under bench/ run end to end at toy sizes and report what their tables promise: they are not
timed tests, but a layer protocol or module path that moves under them must not break them unseen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_bench(script: str, *arguments: str) -> str:
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), *arguments], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_layer_benchmark_reports_each_granular_variant_beside_its_floor(tmp_path):
    out = tmp_path / "layer.json"
    run_bench("layer.py", "--variants", "32e-8", "32e-16", "--precisions", "fp32", "--no-routed", "--rounds", "1",
              "--warmup", "0", "--batch", "32", "--seq", "2", "--reference_positions", "1", "--out", str(out))
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert rows["mot_32e_16"]["num_experts"] == 512 and rows["mot_32e_16"]["expert_size"] == 128
    assert rows["mot_32e_16"]["flop_floor"] == pytest.approx(1.375)
    assert rows["mot_32e_8"]["flop_floor"] == pytest.approx(1 + 1.5 * 256 / 2048)
    seconds, saved = report["seconds"]["fp32"], report["saved_bytes"]["fp32"]
    assert set(seconds) == set(rows) and all(value > 0 for value in seconds.values())
    # Recomputation keeps less for backward than the plain layer at every granularity.
    for variant in ("mot_32e_8", "mot_32e_16"):
        assert saved[f"{variant}_recompute"] < saved[variant]
    assert report["mot_32e_16_over_floor_fp32"] == pytest.approx(
        seconds["mot_32e_16"] / seconds["dense"] / rows["mot_32e_16"]["flop_floor"])
    assert all(entry["max_abs_difference"] < 1e-4 for entry in report["reference"].values())
    assert set(report["reference"]) == {"mot_32e_8", "mot_32e_16"}


def test_profile_splits_the_wall_clock_and_rates_each_matmul():
    out = run_bench("profile_layer.py", "--variant", "32e-16", "--precision", "fp32", "--types", "dense", "mot",
                    "--steps", "1", "--warmup", "0", "--rows", "4", "--batch", "32", "--seq", "2")
    assert "=> MoT experts ~" in out and "MoT mixing ~" in out
    tables = out.split("of operator time per step")[1:]
    assert len(tables) == 2
    # Every table leads with a matmul, whose GFLOP/s column is filled.
    for table in tables:
        first_row = table.splitlines()[2].split()
        assert first_row[0] in ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")
        assert float(first_row[3]) > 0


def test_training_throughput_times_each_preset(tmp_path):
    out = tmp_path / "throughput.json"
    run_bench("train_throughput.py", "--pairs", "tiny", "--batch", "8", "--seq_len", "16", "--steps", "1",
              "--warmup", "1", "--bf16", "false", "--json", str(out))
    rows = {row["preset"]: row for row in json.loads(out.read_text())["results"]}
    assert set(rows) == {"tiny-dense", "tiny-mot"}
    for row in rows.values():
        assert 0 < row["optimizer_seconds_per_step"] < row["seconds_per_step"]
    assert rows["tiny-dense"]["step_over_dense"] == 1.0 == rows["tiny-dense"]["forward_backward_over_dense"]
    assert all(row["clip_seconds_per_step"] > 0 for row in rows.values())


def test_generation_benchmark_decodes_with_each_experts_implementation(tmp_path):
    out = tmp_path / "generate.json"
    run_bench("generate.py", "--preset", "tiny-mot", "--hidden_size", "64", "--new_tokens", "4", "--prompt_len", "4",
              "--rounds", "1", "--out", str(out))
    text = out.read_text()
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        assert implementation in text
