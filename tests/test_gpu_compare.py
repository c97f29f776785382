"""bench/gpu/compare.py, the GPU comparison, runs at toy size on the CPU so that it cannot rot before a GPU comes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_comparison_runs_end_to_end_at_toy_size(shared_data, tmp_path):
    corpus = shared_data / "eltec_eng" / "eltec_eng_level1_body.txt.gz"
    out = tmp_path / "gpu"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu" / "compare.py"), "--toy", "--device", "cpu",
                             "--corpus", str(corpus), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "gpu_results.json").read_text())
    assert list(results["runs"]) == ["transformer-medium", "mot-medium-32e", "mot-medium-32e-16"]
    runs = list(results["runs"].values())
    for run in runs:
        assert run["stopped"] is None and run["tokens"] == results["steps"] * results["batch"] * results["seq_len"]
        assert math.isfinite(run["final_eval_loss"]) and run["tokens_per_second"] > 0
        assert [p["step"] for p in run["curve"]][0] == 0 and run["curve"][-1]["step"] == results["steps"]
        assert run["curve"][-1]["eval_loss"] < run["curve"][0]["eval_loss"]  # it learns
    # /16 splits each expert in 16: the same expert parameters, only the controller grows.
    dense, mot, mot16 = runs
    assert dense["parameters"] < mot["parameters"] < mot16["parameters"]
    assert mot16["config"]["num_experts"] == 16 * mot["config"]["num_experts"]
    assert results["epochs"] <= 2
    assert set(results["layer"]["seconds"]) == {"bf16", "bf16_autocast"}
    text = (out / "gpu_results.md").read_text()
    for run in runs:
        assert f"| {run['preset']} | " in text
    assert "x dense" in text


def test_gpu_comparison_refuses_a_missing_corpus(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu" / "compare.py"), "--toy", "--corpus",
                             str(tmp_path / "none.txt.gz"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "does not exist" in result.stderr
