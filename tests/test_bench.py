"""The CPU benchmarks under bench/ run end to end at toy sizes and report what their tables promise: they are not
timed tests, but a layer protocol or module path that moves under them must not break them unseen. (bench/layer.py
runs inside bench/gpu/run.sh, which tests/test_gpu_compare.py checks.)"""

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


def test_profile_splits_the_wall_clock_and_rates_each_matmul():
    out = run_bench("profile_layer.py", "--variant", "32e-16", "--precision", "fp32", "--types", "mot",
                    "--steps", "1", "--warmup", "0", "--rows", "4", "--batch", "32", "--seq", "2")
    assert "=> MoT experts ~" in out and "MoT mixing ~" in out
    tables = out.split("of operator time per step")[1:]
    assert len(tables) == 1
    # The table leads with a matmul, whose GFLOP/s column is filled.
    first_row = tables[0].splitlines()[2].split()
    assert first_row[0] in ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")
    assert float(first_row[3]) > 0


def test_kernels_are_each_timed_and_summed_by_part_with_the_layout_passes_where_the_layer_makes_them():
    from mixture_of_tokens import cpu_kernels

    def kernels(precision: str, *extra: str) -> str:
        return run_bench("profile_layer.py", "--kernels", "--variant", "32e-16", "--precision", precision,
                         "--steps", "1", "--warmup", "0", "--batch", "32", "--seq", "2", *extra)

    bf16, fp32 = kernels("bf16", "--batched_matmuls"), kernels("fp32")
    assert "expert-major copies" in bf16 and "transposed views" in fp32  # CPU bf16 copies, fp32 reads views
    assert "copy [E,p,d] -> [p,E,d] (emit)" in bf16 and "copy [E,p,d] -> [p,E,d]" not in fp32
    sums = dict(item.rsplit(" ", 1) for item in bf16.split("six products: ")[1].replace(";", ",").split(", "))
    assert float(sums["dense"]) == 1.0 and float(sums["MoT"]) > 0 and float(sums["layout"]) >= 0
    rows = [line.split() for line in bf16.splitlines() if line.strip().startswith("experts ")]
    assert len(rows) == 6 and all(float(row[-1]) > 0 for row in rows)  # each with its GFLOP/s
    if cpu_kernels.cpu_runs_kernels():  # what the layer runs here: compiled merge, emit and products, no layout passes
        compiled = kernels("bf16")
        assert "MoT's merge, emit and expert products: compiled kernels" in compiled and "copy [E,p,d]" not in compiled
        rows = [line.split() for line in compiled.splitlines() if line.strip().startswith("experts ")]
        assert len(rows) == 6 and all(float(row[-1]) > 0 for row in rows)
        rows = [line.split() for line in compiled.splitlines() if line.strip().startswith("compiled ")]
        assert len(rows) == 5 and all(float(row[-1]) > 0 for row in rows)
        sums = dict(item.rsplit(" ", 1) for item in compiled.split("six products: ")[1].replace(";", ",").split(", "))
        assert float(sums["layout"]) == 0 and float(sums["mixing"]) > 0


def test_training_throughput_times_each_preset(tmp_path):
    out = tmp_path / "throughput.json"
    run_bench("train_throughput.py", "--pairs", "tiny", "--batch", "8", "--seq_len", "16", "--steps", "1",
              "--warmup", "1", "--bf16", "false", "--json", str(out))
    rows = {row["preset"]: row for row in json.loads(out.read_text())["results"]}
    assert set(rows) == {"tiny-dense", "tiny-mot"}
    for row in rows.values():
        assert 0 < row["optimizer_seconds_per_step"] < row["seconds_per_step"]
    assert rows["tiny-dense"]["step_over_dense"] == 1.0 == rows["tiny-dense"]["forward_backward_over_dense"]
    # The dense step at its own floor, with its own clipping and optimizer, is the dense step.
    assert rows["tiny-dense"]["floor_with_optimizer"] == pytest.approx(1.0)
    assert all(row["clip_seconds_per_step"] > 0 for row in rows.values())
    assert {row["weights_dtype"] for row in rows.values()} == {"float32"}


def test_training_throughput_interleaved_pairs_each_step_with_the_dense_step_of_its_round(tmp_path):
    out = tmp_path / "throughput.json"
    run_bench("train_throughput.py", "--presets", "tiny-dense", "tiny-mot", "--batch", "8", "--seq_len", "16",
              "--steps", "3", "--warmup", "1", "--grad_accum", "2", "--bf16", "false", "--interleaved",
              "--json", str(out))
    rows = {row["preset"]: row for row in json.loads(out.read_text())["results"]}
    dense, mot = rows["tiny-dense"], rows["tiny-mot"]
    assert dense["round_ratios"] == [1.0, 1.0, 1.0]
    expected = [seconds / dense_seconds
                for seconds, dense_seconds in zip(mot["step_seconds"], dense["step_seconds"], strict=True)]
    assert mot["round_ratios"] == pytest.approx(expected) and len(expected) == 3
    assert mot["round_ratio_median"] == pytest.approx(sorted(expected)[1])
    for row in rows.values():  # clipping and the optimizer are timed inside each step
        assert 0 < row["clip_seconds_per_step"] < row["seconds_per_step"]
        assert 0 < row["optimizer_seconds_per_step"] < row["seconds_per_step"]


def test_training_throughput_takes_bf16_weights_and_another_vocabulary(tmp_path):
    """`--bf16_weights` trains bf16 weights (as `mot train --bf16_weights true`) and `--vocab_size` replaces the
    presets' vocabulary, as the issue's step figures need (bf16 weights, 8192 tokens)."""
    from mixture_of_tokens import MoTConfig, MoTForCausalLM

    out = tmp_path / "throughput.json"
    run_bench("train_throughput.py", "--presets", "tiny-dense", "--batch", "8", "--seq_len", "16", "--steps", "1",
              "--warmup", "1", "--bf16", "false", "--bf16_weights", "--vocab_size", "300", "--json", str(out))
    (row,) = json.loads(out.read_text())["results"]
    assert row["weights_dtype"] == "bfloat16"
    config = MoTConfig.from_preset("tiny-dense", vocab_size=300, max_position_embeddings=64)  # as the script builds it
    expected = MoTForCausalLM(config).num_parameters()
    assert row["parameters"] == expected


def test_generation_benchmark_decodes_with_each_experts_implementation(tmp_path):
    out = tmp_path / "generate.json"
    run_bench("generate.py", "--preset", "tiny-mot", "--hidden_size", "64", "--new_tokens", "4", "--prompt_len", "4",
              "--rounds", "1", "--out", str(out))
    text = out.read_text()
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        assert implementation in text
