"""lm-evaluation-harness as its users run it, each in a real process: the stock `lm_eval --model hf` on a saved Token
Choice folder (remote code), the shipped offline tasks (`--include_path`, `MOT_EVAL_DATA`), `mot lm-eval` with the
batch-aware `mot` model, and runs that print none of lm-eval's warnings a user could not act on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixture_of_tokens.evaluation.eval_data import DATA_ENV
from mixture_of_tokens.evaluation.lm_eval_tasks import TASKS_DIR

TASKS = ["piqa", "hellaswag", "arc_easy"]
BIN = Path(sys.executable).parent
# The three lines every run printed before (issue 14, point 7), and lm-eval's notices our own choices caused.
NOISE = ("HF model type is neither marked as CausalLM", "`pretrained` model kwarg is not of type `str`",
         "fatal: not a git repository", "Passed an already-initialized model", "Custom kwargs can be passed",
         "overrides existing task")


@pytest.fixture(scope="module")
def env(shared_data, tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("lm_eval_home")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HOME": str(home / "hf"), "MOT_CACHE": str(home / "mot_cache"), DATA_ENV: str(shared_data)}


@pytest.fixture(scope="module")
def folders(tiny_model_folder, tiny_tokenizer) -> dict[str, Path]:
    """Untrained tiny MoT and Token Choice folders as `save_pretrained` writes them (auto_map + the three code files)."""
    return {name: tiny_model_folder(name, tokenizer=tiny_tokenizer, max_position_embeddings=256,
                                    mlp_types=["dense", "dense", name, name], bos_token_id=0, eos_token_id=0,
                                    pad_token_id=0) for name in ("mot", "token_choice")}


def run(command: list[str], env: dict, cwd: Path, expect: int = 0) -> str:
    """Run a command as a user would (outside any git repository); return stdout + stderr."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == expect, output[-4000:]
    return output


def scores(results: dict) -> dict:
    return {task: {metric: value for metric, value in results["results"][task].items() if metric != "alias"}
            for task in results["results"]}


def lm_eval_results(output_path: Path) -> dict:
    (found,) = output_path.glob("**/results_*.json")
    return json.loads(found.read_text())


# ----------------------------------------------------------------------------------------------- shipped tasks
def test_shipped_tasks_repeat_the_stock_yaml():
    """Prompts, targets, choices, processing and metrics are lm-eval's own; only the data source differs."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    stock_root = Path(lm_eval.tasks.__file__).parent
    data_keys = {"dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "training_split",
                 "validation_split", "test_split", "tag", "process_docs"}
    for task, stock_file in (("piqa", "piqa/piqa.yaml"), ("hellaswag", "hellaswag/hellaswag.yaml"),
                             ("arc_easy", "arc/arc_easy.yaml")):
        stock = load_yaml(stock_root / stock_file, resolve_func=True)
        ours = load_yaml(TASKS_DIR / f"{task}.yaml", resolve_func=True)
        assert {k: v for k, v in ours.items() if k not in data_keys} == \
               {k: v for k, v in stock.items() if k not in data_keys}, task
        evaluated = "test_split" if stock.get("test_split") else "validation_split"
        assert ours[evaluated] == stock[evaluated] and not ours.get("training_split")
        if "process_docs" in stock:  # lm-eval's own function, not a copy
            assert ours["process_docs"].__code__.co_code == stock["process_docs"].__code__.co_code
            assert ours["process_docs"].__module__.endswith("hellaswag.utils")


def test_shipped_tasks_read_the_documents_of_mot_eval(shared_data, tmp_path, monkeypatch):
    """`--include_path` tasks and `mot eval --data_dir` build the same requests from the same documents."""
    from lm_eval.tasks import TaskManager

    from mixture_of_tokens.evaluation.evaluation import prepare_tasks

    monkeypatch.setenv(DATA_ENV, str(shared_data))
    monkeypatch.setenv("MOT_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    shipped = TaskManager(include_defaults=False, include_path=str(TASKS_DIR)).load(TASKS)["tasks"]
    prepared = prepare_tasks(TASKS, str(shared_data), cache_dir=tmp_path)
    reference = prepared.task_manager.load(prepared.specs)["tasks"]
    for name in TASKS:
        ours, theirs = shipped[name], reference[name]
        ours_docs, their_docs = ours.eval_docs, theirs.eval_docs
        assert len(ours_docs) == len(their_docs) == {"piqa": 1838, "hellaswag": 10042, "arc_easy": 2376}[name]
        for doc, other in zip(ours_docs.select(range(40)), their_docs.select(range(40)), strict=True):
            assert doc == other
            assert (ours.doc_to_text(doc), ours.doc_to_choice(doc), ours.doc_to_target(doc)) == \
                   (theirs.doc_to_text(other), theirs.doc_to_choice(other), theirs.doc_to_target(other))


def test_data_folder_errors_are_one_clear_line(shared_data, tmp_path, monkeypatch):
    from mixture_of_tokens.evaluation.lm_eval_tasks import utils
    from mixture_of_tokens.utils import UserError

    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(UserError, match=f"{DATA_ENV} is not set; set it to the folder holding piqa/"):
        utils.load_piqa()
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="nowhere is not a folder"):
        utils.load_arc_easy()
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text((shared_data / "piqa" / "valid.jsonl").read_text())
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(UserError, match=r"is missing piqa/valid-labels.lst \(needed by task 'piqa'\)"):
        utils.load_piqa()


def test_batch_size_flags_are_recognised():
    from mixture_of_tokens.evaluation.lm_eval_cli import names_batch_size

    for argv in (["--batch_size", "4"], ["--batch_size=4"], ["-b", "4"], ["-b4"], ["--batch", "4"],
                 ["--config", "run.yaml"], ["-C", "run.yaml"]):
        assert names_batch_size(["--model", "mot", *argv]), argv
    for argv in (["--max_batch_size", "4"], ["--model_args", "pretrained=x"], ["--tasks", "piqa", "--", "-b"]):
        assert not names_batch_size(argv), argv


def test_mot_model_refuses_loading_options_it_would_ignore():
    from mixture_of_tokens.evaluation.lm_eval_model import MoTLM
    from mixture_of_tokens.utils import UserError

    for bad, shown in (({"peft": "adapter"}, "does not take peft"), ({"batchsize": 8}, "does not take batchsize"),
                       ({"backend": "seq2seq"}, "backend must be causal")):
        with pytest.raises(UserError, match=shown):
            MoTLM._check_arguments(dict(bad))
    MoTLM._check_arguments({"max_length": 64, "trust_remote_code": True, "backend": "causal"})


# ----------------------------------------------------------------------------------------------- real processes
def test_mot_lm_eval_help_is_lm_evals(env, tmp_path):
    output = run([str(BIN / "mot"), "lm-eval", "--help"], env, tmp_path)
    assert "usage: lm-eval" in output and "Language Model Evaluation Harness" in output
    assert "--model mot" in output and str(TASKS_DIR) in output  # our two lines after it


def test_stock_lm_eval_hf_on_a_token_choice_folder(env, folders, shared_data, tmp_path):
    """The stock command, remote code and all, on the shipped offline task; Token Choice is batch-independent, so it
    scores exactly as `mot eval --data_dir` (our model, in this process) on the same documents."""
    from mixture_of_tokens.evaluation.evaluation import load_model_and_tokenizer, run_tasks

    output = run([str(BIN / "lm_eval"), "--model", "hf", "--model_args",
                  f"pretrained={folders['token_choice']},trust_remote_code=True", "--include_path", str(TASKS_DIR),
                  "--tasks", "piqa", "--limit", "8", "--device", "cpu", "--output_path", str(tmp_path / "out")],
                 env, tmp_path)
    assert "HF model type is neither marked as CausalLM" not in output
    stock = lm_eval_results(tmp_path / "out")
    assert stock["n-samples"]["piqa"]["effective"] == 8
    model, tokenizer = load_model_and_tokenizer(folders["token_choice"], device="cpu")
    ours = run_tasks(model, tokenizer, ["piqa"], limit=8, data_dir=str(shared_data), cache_dir=tmp_path / "cache")
    assert scores(stock) == scores(ours)


@pytest.fixture(scope="module")
def mot_eval_run(env, folders, shared_data, tmp_path_factory) -> tuple[str, dict]:
    cwd = tmp_path_factory.mktemp("mot_eval_run")
    output = run([str(BIN / "mot"), "eval", str(folders["mot"]), "--data_dir", str(shared_data), "--limit", "4",
                  "--output", str(cwd / "eval.json")], env, cwd)
    return output, json.loads((cwd / "eval.json").read_text())


def test_mot_eval_prints_no_unactionable_warnings(mot_eval_run):
    output, results = mot_eval_run
    for line in NOISE:
        assert line not in output, line
    assert "Running loglikelihood requests (MoT, fixed groups)" in output and "|piqa" in output
    assert set(results["results"]) == set(TASKS)


def test_mot_lm_eval_runs_the_shipped_tasks_like_mot_eval(env, folders, mot_eval_run, tmp_path):
    """`mot lm-eval --model mot` with the shipped tasks: lm-eval's flags as they are, the model's group size when no
    --batch_size is given, the same scores as `mot eval --data_dir`, and no unactionable warnings."""
    output = run([str(BIN / "mot"), "lm-eval", "--model", "mot", "--model_args", f"pretrained={folders['mot']}",
                  "--include_path", str(TASKS_DIR), "--tasks", ",".join(TASKS), "--limit", "4",
                  "--output_path", str(tmp_path / "out")], env, tmp_path)
    for line in NOISE:
        assert line not in output, line
    results = lm_eval_results(tmp_path / "out")
    assert results["config"]["mot"]["batch_size"] == 8 and results["config"]["mot"]["batch_dependent"] is True
    assert results["config"]["batch_sizes"] == [8]
    assert scores(results) == scores(mot_eval_run[1])


def test_mot_lm_eval_bad_input_is_one_line(env, folders, tmp_path):
    stripped = {key: value for key, value in env.items() if key != DATA_ENV}
    output = run([str(BIN / "mot"), "lm-eval", "--model", "mot", "--model_args", f"pretrained={folders['mot']}",
                  "--include_path", str(TASKS_DIR), "--tasks", "piqa", "--limit", "2"], stripped, tmp_path, expect=2)
    assert output.strip().splitlines()[-1].startswith(f"mot lm-eval: error: {DATA_ENV} is not set")
