"""bench/reproduce_time.py, the estimate of the default reproduction's wall time on this machine, at a few steps."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "docs" / "results" / "run_records"


def test_estimate_compares_the_plans_runs_with_the_committed_records(shared_data, tmp_path):
    out = tmp_path / "estimate.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "reproduce_time.py"), "--steps", "6", "--skip", "2",
                             "--data_dir", str(shared_data), "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    estimate = json.loads(out.read_text())
    manifest = json.loads((RECORDS / "plan.json").read_text())
    assert estimate["reference_minutes"] == pytest.approx(sum(s["seconds"] for s in manifest["sessions"]) / 60, abs=0.1)
    widths = [w["hidden_size"] for w in manifest["budget"]["widths"]]
    assert [row["run"] for row in estimate["rows"]] == [
        f"w{width}-{model}-s0" for width in widths for model in ("dense", "mot", "mot_all", "token_choice")]
    for row in estimate["rows"]:
        record = json.loads((RECORDS / f"{row['run']}.json").read_text())
        there = record["train_seconds"] / record["steps"] / record["workers"]
        assert row["reference_seconds_per_step"] == pytest.approx(there, abs=1e-4)
        assert row["seconds_per_step"] > 0
        assert row["ratio"] == pytest.approx(row["seconds_per_step"] / there, rel=2e-3)
    mean = statistics.fmean(row["ratio"] for row in estimate["rows"])
    assert estimate["estimated_minutes"] == pytest.approx(estimate["reference_minutes"] * mean, abs=0.2)
    assert f"about {estimate['estimated_minutes']:.0f} min here" in result.stdout


def test_estimate_refuses_a_records_folder_without_a_plan(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "reproduce_time.py"), "--records_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "holds no plan.json" in result.stderr


def test_estimate_refuses_a_data_folder_without_the_novels(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "reproduce_time.py"), "--data_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"the novels corpus {tmp_path}" in result.stderr
    assert "Traceback" not in result.stderr
