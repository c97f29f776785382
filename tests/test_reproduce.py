"""`mot reproduce --smoke`: the whole reproduction pipeline (every training run, the transition, the zero-shot evals,
results.json, plots, results.md) runs end to end on the real novels and task data, so it cannot rot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mixture_of_tokens.cli import main as mot
from mixture_of_tokens.reproduce import PLOT_FILES, RUNS, TRANSITION, ZERO_SHOT_TASKS, first_crossing
from mixture_of_tokens.reproduce import main as reproduce

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, shared_data) -> Path:
    output = tmp_path_factory.mktemp("reproduce") / "out"
    assert reproduce(["--smoke", "--output_dir", str(output), "--data_dir", str(shared_data)]) == 0
    return output


def test_results_json_has_every_run_and_experiment(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    for key in ("budget", "runs", "dense_comparison", "bf16", "transition", "transition_summary", "zero_shot",
                "plots", "environment", "caveats"):
        assert key in results, key
    assert results["smoke"] is True
    assert list(results["runs"]) == [spec.name for spec in RUNS]
    steps = results["budget"]["steps"]
    for name, run in results["runs"].items():
        assert math.isfinite(run["final_eval_loss"]), name
        assert run["steps"] == steps  # same schedule for every model
        assert run["curve"][-1]["step"] == steps
        assert run["curve"][-1]["eval_loss"] == pytest.approx(run["final_eval_loss"])
        assert run["train_seconds"] > 0
        assert Path(run["model_dir"], "config.json").is_file()
    runs = results["runs"]
    # The sparse baselines and the MoT variants have the same parameters as MoT; the dense model has fewer.
    assert runs["token_choice"]["num_parameters"] == runs["mot"]["num_parameters"]
    assert runs["expert_choice"]["num_parameters"] == runs["mot"]["num_parameters"]
    # /16: the same expert parameters (E * f) split into 16x more experts; only the controller (d x E) grows.
    x16, mot_run = runs["mot_x16"], runs["mot"]
    assert x16["num_experts"] * x16["expert_size"] == mot_run["num_experts"] * mot_run["expert_size"]
    routed_layers = mot_run["mlp_types"].count("mot")
    controller_growth = (x16["num_experts"] - mot_run["num_experts"]) * results["budget"]["hidden_size"] * routed_layers
    assert x16["num_parameters"] - mot_run["num_parameters"] == controller_growth
    assert runs["dense"]["num_parameters"] < runs["mot"]["num_parameters"]
    assert runs["mot_x16"]["num_experts"] == 16 * runs["mot_x16"]["group_size"]
    assert [runs[n]["group_size"] for n in ("mot", "mot_g16", "mot_g32")] == [8, 16, 32]
    assert runs["mot_bf16"]["bf16_weights"] and not runs["mot"]["bf16_weights"]
    # MoT layers log their mixing entropy; dense has none.
    assert runs["mot"]["routing_entropy"] and not runs["dense"]["routing_entropy"]
    assert 0 < runs["mot"]["routing_entropy"][-1]["normalized"] <= 1.0 + 1e-6

    dense = results["dense_comparison"]["runs"]["dense"]
    assert dense["steps_ratio"] == pytest.approx(1.0)  # dense reaches its own final loss at its last step
    assert set(results["bf16"]) == {"mot", "expert_choice"}
    transition = results["transition"]
    assert transition["optimizer_continued"] is True
    assert transition["curve"][0]["step"] == 0  # the converted model is evaluated before any tuning step
    assert Path(transition["model_dir"], "config.json").is_file()
    tuned_config = json.loads(Path(transition["model_dir"], "config.json").read_text())
    assert "token_choice" in tuned_config["mlp_types"] and "mot" not in tuned_config["mlp_types"]
    assert set(results["zero_shot"]) == {spec.name for spec in RUNS if spec.zero_shot} | {TRANSITION}
    for scores in results["zero_shot"].values():
        for task in ZERO_SHOT_TASKS:
            assert 0.0 <= scores[task]["value"] <= 1.0


def test_plots_exist_and_are_png(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    assert sorted(results["plots"]) == sorted(f"results/{name}" for name in PLOT_FILES)
    for relative in results["plots"]:
        data = (smoke_run / relative).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, relative


def test_results_markdown_tables(smoke_run):
    text = (smoke_run / "results.md").read_text()
    results = json.loads((smoke_run / "results.json").read_text())
    assert "SMOKE RUN" in text
    for spec in RUNS:
        row = next(line for line in text.splitlines() if line.startswith(f"| {spec.name} |"))
        assert f"{results['runs'][spec.name]['final_eval_loss']:.4f}" in row
    for model in results["zero_shot"]:
        assert any(line.startswith(f"| {model} | ") and line.count("|") == len(ZERO_SHOT_TASKS) + 3
                   for line in text.splitlines()), model
    for model in ("mot", "expert_choice"):  # bf16 table: model | full precision | bf16-only | degradation
        row = f"| {model} | {results['bf16'][model]['full_precision_loss']:.4f} | "
        assert any(line.startswith(row) and line.count("|") == 5 for line in text.splitlines()), model
    for name in PLOT_FILES:
        assert f"(results/{name})" in text
    assert "Where this differs from the paper" in text


def test_report_only_redraws_plots_and_markdown_from_results_json(smoke_run):
    original = (smoke_run / "results.md").read_text()
    (smoke_run / "results.md").unlink()
    for name in PLOT_FILES:
        (smoke_run / "results" / name).unlink()
    assert reproduce(["--report_only", "--output_dir", str(smoke_run)]) == 0
    assert (smoke_run / "results.md").read_text() == original
    assert all((smoke_run / "results" / name).is_file() for name in PLOT_FILES)


def test_resume_keeps_finished_runs(smoke_run, shared_data):
    before = json.loads((smoke_run / "results.json").read_text())
    model_file = Path(before["runs"]["dense"]["model_dir"]) / "model.safetensors"
    stamp = model_file.stat().st_mtime_ns
    assert reproduce(["--smoke", "--resume", "--output_dir", str(smoke_run), "--data_dir", str(shared_data)]) == 0
    after = json.loads((smoke_run / "results.json").read_text())
    assert after["runs"] == before["runs"] and after["zero_shot"] == before["zero_shot"]
    assert model_file.stat().st_mtime_ns == stamp  # nothing was retrained


def test_first_crossing_interpolates_and_reports_never():
    curve = [{"step": 10, "eval_loss": 5.0, "train_seconds": 1.0},
             {"step": 20, "eval_loss": 4.0, "train_seconds": 3.0}]
    assert first_crossing(curve, 4.5, "step") == pytest.approx(15.0)
    assert first_crossing(curve, 4.5, "train_seconds") == pytest.approx(2.0)
    assert first_crossing(curve, 6.0, "step") == 10.0
    assert first_crossing(curve, 3.0, "step") is None


@pytest.mark.parametrize("argv, message", [
    (["--smoke", "--scale", "0"], "--scale must be a positive integer"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--smoke", "--scale", "2"], "exclude each other"),
])
def test_bad_arguments_give_one_clear_error(argv, message, tmp_path, shared_data, capsys):
    assert mot(["reproduce", *argv, "--output_dir", str(tmp_path / "x"), "--data_dir", str(shared_data)]) == 2
    assert message in capsys.readouterr().err


def test_missing_data_and_non_empty_output_are_refused(tmp_path, shared_data, capsys):
    assert mot(["reproduce", "--smoke", "--output_dir", str(tmp_path / "x"), "--data_dir", str(tmp_path)]) == 2
    assert "no novels corpus" in capsys.readouterr().err
    assert mot(["reproduce", "--report_only", "--output_dir", str(tmp_path / "none")]) == 2
    assert "no results.json" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert mot(["reproduce", "--smoke", "--output_dir", str(tmp_path / "full"), "--data_dir", str(shared_data)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"


def test_bench_wrapper_reports_bad_input():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "reproduce.py"), "--scale", "-1"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "--scale must be a positive integer" in result.stderr
