"""`python -m experiments --smoke`: the whole reproduction plan (learning-rate sweep, both widths with seeds, the
routed-weight and authors'-wrapper runs, the extras, the transition, the zero-shot evals, the report) runs end to end on the real
novels and task data, side by side in two worker processes, so it cannot rot."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.plan import MAIN, SWEEP, make_budget, make_plan
from experiments.report import PLOT_FILES, ZERO_SHOT_TASKS, Collected, comparison, first_crossing
from experiments.runner import RunRecords, cpu_model
from experiments.runner import main as reproduce
from mixture_of_tokens.utils import UserError

REPO = Path(__file__).resolve().parents[1]
SMOKE_PLAN = make_plan(make_budget(smoke=True))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, shared_data) -> Path:
    output = tmp_path_factory.mktemp("reproduce") / "out"
    assert reproduce(["--smoke", "--output_dir", str(output), "--data_dir", str(shared_data), "--workers", "2",
                      "--threads_per_worker", "1"]) == 0
    return output


def records(output: Path) -> RunRecords:
    return RunRecords(output / "run_records")


def test_every_planned_job_is_recorded_with_the_chosen_learning_rate(smoke_run):
    found = records(smoke_run)
    budget = SMOKE_PLAN.budget
    for run in SMOKE_PLAN.runs:
        record = found.get(run.key)
        assert math.isfinite(record["final_eval_loss"]), run.key
        assert record["steps"] == run.steps and record["curve"][-1]["step"] == run.steps
        assert record["curve"][-1]["eval_loss"] == pytest.approx(record["final_eval_loss"])
        assert record["seed"] == run.seed and record["workers"] == 2 and record["threads"] == 1
    for width in budget.widths:
        sweep = {run.learning_rate: found.get(run.key)["final_eval_loss"] for run in SMOKE_PLAN.sweep(width.hidden_size)}
        chosen = min(sweep, key=sweep.get)
        for run in SMOKE_PLAN.runs:  # every non-sweep run of the width trains at the sweep's best rate
            if run.width == width.hidden_size and run.section != SWEEP and found.has(run.key):
                assert found.get(run.key)["learning_rate"] == chosen, run.key
    assert found.has(SMOKE_PLAN.transition.key)
    for run in (*SMOKE_PLAN.zero_shot, SMOKE_PLAN.transition):
        scores = found.get(f"{run.key}-zero_shot")
        for task in ZERO_SHOT_TASKS:
            assert 0.0 <= scores[task]["value"] <= 1.0
    manifest = found.manifest()
    assert manifest["sessions"][-1]["seconds"] > 0 and manifest["tokenizer"]
    # The sitting names the machine its timings come from, and the report says it.
    environment = manifest["sessions"][-1]["environment"]
    assert environment["cpu"] == cpu_model() and isinstance(environment["native_bf16"], bool)
    assert f"- Machine: {environment['cpu']}, " in (smoke_run / "results.md").read_text()


def test_models_are_flop_matched_and_routing_is_recorded(smoke_run):
    found = records(smoke_run)
    width = SMOKE_PLAN.budget.widths[0].hidden_size

    def record(model, seed=0):
        return found.get(next(r.key for r in SMOKE_PLAN.runs if r.model == model and r.width == width
                              and r.seed == seed and r.section in (MAIN, "routed_weight")))

    mot_run, uniform = record("mot"), record("mot_uniform")
    assert record("token_choice")["num_parameters"] == mot_run["num_parameters"] == uniform["num_parameters"]
    assert record("expert_choice")["num_parameters"] == mot_run["num_parameters"]
    assert record("dense")["num_parameters"] < mot_run["num_parameters"] < record("mot_all")["num_parameters"]
    assert record("mot_all")["mlp_types"] == ["mot"] * len(mot_run["mlp_types"])
    # Routing over training: every MoT layer logs its entropy and top-token weight; uniform routing is exactly
    # uniform (entropy log G, top weight 1/G), softmax routing is at most that.
    for series, exact in ((mot_run["routing"], False), (uniform["routing"], True)):
        assert series and set(series[-1]["layers"]) == {str(i) for i, t in enumerate(mot_run["mlp_types"]) if t == "mot"}
        for point in series:
            for stats in point["layers"].values():
                assert 0 < stats["normalized_entropy"] <= 1 + 1e-4
                assert 1 / mot_run["group_size"] - 1e-4 <= stats["max_weight"] <= 1
                if exact:
                    assert stats["normalized_entropy"] == pytest.approx(1.0, abs=1e-4)
    assert not record("dense")["routing"]


def test_extras_are_the_papers_secondary_settings(smoke_run):
    """/16 keeps the expert parameters (E * f) and grows only the controller; the group-size sweep keeps E = G;
    the bf16 pair keeps its weights in bf16; every extra shares the shorter schedule."""
    found = records(smoke_run)
    extra = {run.model: found.get(run.key) for run in SMOKE_PLAN.runs if run.steps == SMOKE_PLAN.budget.extra_steps
             and run.section not in (SWEEP, MAIN)}
    x16, mot_run = extra["mot_x16"], extra["mot"]
    assert x16["num_experts"] * x16["expert_size"] == mot_run["num_experts"] * mot_run["expert_size"]
    assert x16["num_experts"] == 16 * x16["group_size"]
    routed_layers = mot_run["mlp_types"].count("mot")
    controller_growth = (x16["num_experts"] - mot_run["num_experts"]) * mot_run["width"] * routed_layers
    assert x16["num_parameters"] - mot_run["num_parameters"] == controller_growth
    assert [extra[name]["group_size"] for name in ("mot", "mot_g16", "mot_g32")] == [8, 16, 32]
    assert [extra[name]["num_experts"] for name in ("mot", "mot_g16", "mot_g32")] == [8, 16, 32]
    assert extra["mot_bf16"]["bf16_weights"] and not mot_run["bf16_weights"]
    assert extra["expert_choice_bf16"]["num_parameters"] == extra["expert_choice"]["num_parameters"]
    assert extra["mot_t_learned"]["routing"] and extra["mot_t2"]["routing"][-1]["layers"]


def test_results_json_compares_models_per_width_with_seeds(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    first, second = (str(w.hidden_size) for w in SMOKE_PLAN.budget.widths)
    block = results["comparison"][first]
    assert block["models"]["mot"]["seeds"] == [0, 1] and block["models"]["dense"]["seeds"] == [0, 1]
    mot_losses, dense_losses = block["models"]["mot"]["final_eval_losses"], block["models"]["dense"]["final_eval_losses"]
    difference = block["differences"]["MoT - dense"]
    assert difference["per_seed"] == pytest.approx([m - d for m, d in zip(mot_losses, dense_losses, strict=True)],
                                                   abs=2e-4)
    assert difference["threshold_from"] == "these seeds"
    assert results["comparison"][second]["models"]["mot"]["seeds"] == [0]
    assert results["comparison"][second]["differences"]["MoT - dense"]["threshold_from"] == "first width's seeds"
    assert results["learning_rate_sweep"][first]["chosen"] == block["learning_rate"]
    assert set(results["extras"]["bf16_degradation"]) == {"mot", "expert_choice"}
    assert results["transition"]["optimizer_continued"] and results["transition"]["curve"][0]["step"] == 0
    assert results["authors_wrapper"]["losses"]["mot_authors"] > 0
    assert f"{first}/mot" in results["routing"] and f"{first}/mot_all" in results["routing"]
    assert results["total_seconds"] > 0
    assert set(results["expected_keys"]) <= set(results["recorded_keys"])  # nothing missing: not "PARTIAL"


def test_report_markdown_and_plots(smoke_run):
    text = (smoke_run / "results.md").read_text()
    results = json.loads((smoke_run / "results.json").read_text())
    assert "SMOKE RUN" in text and "PARTIAL" not in text
    for width, block in results["comparison"].items():
        assert f"### Width {width}" in text
        for name, model in block["models"].items():
            assert any(line.startswith(f"| {name} |") and f"{model['mean']:.4f}" in line for line in text.splitlines())
        for label in block["differences"]:
            assert any(line.startswith(f"| {label} |") for line in text.splitlines()), label
    # The across-widths table: one row per difference, each width's mean in its own column, in width order.
    across = text.split("### Across widths", 1)[1].split("\n\n![", 1)[0].splitlines()
    widths = list(results["comparison"])
    assert f"| difference | {' | '.join(f'width {w}' for w in widths)} |" in across
    mot_row = next(line for line in across if line.startswith("| MoT - dense |"))
    cells = [cell.strip() for cell in mot_row.strip("|").split("|")[1:]]
    assert [cell.split()[0] for cell in cells] == [
        f"{results['comparison'][w]['differences']['MoT - dense']['mean']:+.4f}" for w in widths]
    for heading in ("Learning rate", "What the routing does", "authors' wrapper", "Extra experiments",
                    "Transition tuning", "Zero-shot"):
        assert heading in text
    assert sorted(results["plots"]) == sorted(f"results/{name}" for name in PLOT_FILES)
    for relative in results["plots"]:
        data = (smoke_run / relative).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000, relative
        assert f"({relative})" in text


def test_report_only_redraws_from_the_records(smoke_run):
    original = (smoke_run / "results.md").read_text()
    (smoke_run / "results.md").unlink()
    for name in PLOT_FILES:
        (smoke_run / "results" / name).unlink()
    assert reproduce(["--smoke", "--report_only", "--output_dir", str(smoke_run)]) == 0
    assert (smoke_run / "results.md").read_text() == original
    assert all((smoke_run / "results" / name).is_file() for name in PLOT_FILES)


def test_resume_trains_only_what_is_missing(smoke_run, shared_data, tmp_path):
    # A later sitting in a fresh clone: the committed records, no model folders. Drop the transition's records:
    # resuming must retrain its MoT source (whose checkpoint is gone) and the transition, and nothing else.
    clone = tmp_path / "clone"
    shutil.copytree(smoke_run / "run_records", clone / "run_records")
    found = records(clone)
    transition = SMOKE_PLAN.transition
    kept = {key: found.get(key) for key in found.keys()}
    for key in (transition.key, f"{transition.key}-zero_shot"):
        found.drop(key)
    argv = ["--smoke", "--resume", "--output_dir", str(clone), "--data_dir", str(shared_data), "--workers", "1"]
    assert reproduce(argv) == 0
    retrained = {transition.source.key, transition.key, f"{transition.key}-zero_shot"}
    for key, record in kept.items():
        if key not in retrained:
            assert found.get(key) == record, key  # untouched
    assert (clone / "runs" / transition.source.key / "config.json").is_file()
    assert not (clone / "runs" / SMOKE_PLAN.runs[0].key).exists()  # the sweep was not retrained
    assert len(found.manifest()["sessions"]) == 2
    # Resuming a finished reproduction trains nothing.
    stamp = (clone / "runs" / transition.key / "model.safetensors").stat().st_mtime_ns
    assert reproduce(argv) == 0
    assert (clone / "runs" / transition.key / "model.safetensors").stat().st_mtime_ns == stamp


def test_difference_is_real_only_beyond_the_seed_spread(tmp_path):
    budget = make_budget(smoke=True)
    plan = make_plan(budget, sections=("sweep", "main"))
    found = RunRecords(tmp_path)
    found.start({"budget": budget.as_dict()})
    losses = {"dense": (3.0, 3.1), "mot": (2.8, 2.9), "mot_uniform": (2.95, 3.2), "token_choice": (3.0, 3.1),
              "expert_choice": (3.0, 3.1)}
    for run in plan.runs:
        if run.section == SWEEP:
            loss = losses["dense"][0] + (0 if run.learning_rate == budget.widths[0].learning_rates[0] else 0.5)
        else:
            loss = losses[run.model][run.seed] + (0 if run.width == budget.widths[0].hidden_size else 0.05)
        found.put(run.key, {"key": run.key, "model": run.model, "seed": run.seed, "final_eval_loss": loss,
                            "num_parameters": 1, "description": run.model, "train_seconds": 1.0, "steps": run.steps,
                            "curve": [{"step": run.steps, "eval_loss": loss, "train_seconds": 1.0}], "routing": []})
    first = comparison(Collected(plan, found))[str(budget.widths[0].hidden_size)]
    assert first["learning_rate"] == budget.widths[0].learning_rates[0]
    # MoT - dense = -0.2 on both seeds; the largest seed spread of the two is 0.1: real.
    assert first["differences"]["MoT - dense"] == {"per_seed": [-0.2, -0.2], "mean": -0.2, "threshold": 0.1,
                                                   "threshold_from": "these seeds", "real": True}
    # MoT - uniform = -0.15, -0.3; uniform's own spread is 0.25: not real.
    assert first["differences"]["MoT - uniform"]["real"] is False
    assert first["differences"]["Token Choice - dense"]["real"] is False


def test_first_crossing_interpolates_and_reports_never():
    curve = [{"step": 10, "eval_loss": 5.0, "train_seconds": 1.0},
             {"step": 20, "eval_loss": 4.0, "train_seconds": 3.0}]
    assert first_crossing(curve, 4.5, "step") == pytest.approx(15.0)
    assert first_crossing(curve, 4.5, "train_seconds") == pytest.approx(2.0)
    assert first_crossing(curve, 6.0, "step") == 10.0
    assert first_crossing(curve, 3.0, "step") is None


def test_default_plan_meets_the_evidence_budget():
    """The default plan: widths 128 and 256, >= 5M tokens per run, >= 2 seeds at 128, a dense learning-rate sweep
    per width, MoT - uniform measurable with routed layers in every block at every width."""
    plan = make_plan(make_budget())
    budget = plan.budget
    assert [w.hidden_size for w in budget.widths] == [128, 256]
    assert budget.steps * budget.tokens_per_step >= 5_000_000
    assert len(budget.widths[0].seeds) >= 2
    for width in budget.widths:
        assert len(plan.sweep(width.hidden_size)) >= 3
        models = {run.model for run in plan.runs if run.width == width.hidden_size}
        assert {"dense", "mot", "mot_uniform", "token_choice", "mot_all", "mot_all_uniform"} <= models


@pytest.mark.parametrize("argv, message", [
    (["--smoke", "--sections", "main,bogus"], "--sections: unknown part 'bogus'"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--smoke", "--workers", "0"], "--workers must be a positive integer"),
])
def test_bad_arguments_give_one_clear_error(argv, message, tmp_path, shared_data):
    with pytest.raises(UserError, match=re.escape(message)):
        reproduce([*argv, "--output_dir", str(tmp_path / "x"), "--data_dir", str(shared_data)])


def test_missing_data_existing_output_and_foreign_records_are_refused(tmp_path, shared_data, smoke_run):
    with pytest.raises(UserError, match="no novels corpus"):
        reproduce(["--smoke", "--output_dir", str(tmp_path / "x"), "--data_dir", str(tmp_path)])
    with pytest.raises(UserError, match="no run records"):
        reproduce(["--report_only", "--output_dir", str(tmp_path / "none")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="--overwrite"):
        reproduce(["--smoke", "--output_dir", str(tmp_path / "full"), "--data_dir", str(shared_data)])
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    # Records of another budget are not resumed into (and not deleted).
    shutil.copytree(smoke_run / "run_records", tmp_path / "other" / "run_records")
    with pytest.raises(UserError, match="another budget"):
        reproduce(["--smoke", "--steps", "3", "--resume", "--output_dir", str(tmp_path / "other"),
                   "--data_dir", str(shared_data)])
    assert len(list((tmp_path / "other" / "run_records").glob("*.json"))) > 10


def test_the_command_reports_bad_input_in_one_line():
    result = subprocess.run([sys.executable, "-m", "experiments", "--steps", "-1"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip() == "python -m experiments: error: --steps must be a positive integer, got -1"
