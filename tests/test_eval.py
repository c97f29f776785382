"""`mot eval`: lm-eval's stock PIQA/HellaSwag/ARC-Easy on local release files, the MoT-aware lm-eval model,
perplexity, stored scores, and one clear error per bad input. Everything runs offline on ../shared/data."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from mixture_of_tokens import cli
from mixture_of_tokens.evaluation.eval_data import convert_arc, convert_hellaswag, convert_piqa
from mixture_of_tokens.evaluation.evaluation import load_model_and_tokenizer, prepare_tasks, run_tasks

TASKS = ["piqa", "hellaswag", "arc_easy"]
LIMIT = 20


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("MOT_CACHE", str(tmp_path_factory.getbasetemp() / "mot_cache"))


@pytest.fixture(scope="module")
def local_tasks(shared_data, tmp_path_factory):
    """The three stock tasks on the converted release files (built once, shared by the runs below)."""
    return prepare_tasks(TASKS, str(shared_data), cache_dir=tmp_path_factory.mktemp("converted"))


def accuracies(results: dict) -> dict[tuple[str, str], float]:
    return {(task, metric): results["results"][task][f"{metric},none"] for task in results["results"]
            for metric in ("acc", "acc_norm")}


# ----------------------------------------------------------------------------------------------- converters
# Records written out by hand from the release files (line numbers are 1-based).
PIQA_LINE_2 = {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin ",
               "label": 1}
HELLASWAG_LINE_1 = {
    "ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
    "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": "3",
    "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                "starts pulling up roofing on a roof."],
    "source_id": "activitynet~v_-JhWjGDPHMY",
}
ARC_LINE_15 = {"id": "NYSEDREGENTS_2015_8_28", "question": "All living and nonliving material is composed of",
               "choices": {"text": ["air", "elements", "water", "soil"], "label": ["1", "2", "3", "4"]},
               "answerKey": "2"}


def test_converters_reproduce_hub_fields(shared_data):
    piqa, hellaswag, arc = convert_piqa(shared_data), convert_hellaswag(shared_data), convert_arc(shared_data)
    assert (len(piqa), len(hellaswag), len(arc)) == (1838, 10042, 2376)
    assert piqa[0]["label"] == 0 and piqa[0]["goal"] == "How do I ready a guinea pig cage for it's new occupants?"
    assert piqa[1] == PIQA_LINE_2
    assert hellaswag[0] == HELLASWAG_LINE_1
    assert arc[14] == ARC_LINE_15
    assert arc[0]["choices"]["label"] == ["A", "B", "C", "D"] and arc[0]["answerKey"] == "A"


def test_stock_tasks_read_local_files(local_tasks):
    """The stock YAMLs (prompts, hellaswag's process_docs, targets) applied to the converted documents."""
    assert all(source["release_files"] for source in local_tasks.sources.values())
    tasks = local_tasks.task_manager.load(local_tasks.specs)["tasks"]
    piqa = tasks["piqa"].validation_docs()[1]
    assert tasks["piqa"].doc_to_text(piqa) == "Question: dresser\nAnswer:"
    assert tasks["piqa"].doc_to_choice(piqa) == [PIQA_LINE_2["sol1"], PIQA_LINE_2["sol2"]]
    assert tasks["piqa"].doc_to_target(piqa) == 1
    hellaswag = tasks["hellaswag"].validation_docs()[0]
    assert tasks["hellaswag"].doc_to_text(hellaswag) == "Roof shingle removal: A man is sitting on a roof. He"
    assert tasks["hellaswag"].doc_to_choice(hellaswag) == HELLASWAG_LINE_1["endings"]
    assert tasks["hellaswag"].doc_to_target(hellaswag) == 3
    arc_task = tasks["arc_easy"]
    assert not arc_task.has_training_docs() and not arc_task.has_validation_docs()
    arc = arc_task.test_docs()[14]
    assert arc_task.doc_to_text(arc) == "Question: All living and nonliving material is composed of\nAnswer:"
    assert arc_task.doc_to_choice(arc) == ["air", "elements", "water", "soil"]
    assert arc_task.doc_to_target(arc) == 1


# ----------------------------------------------------------------------------------------------- full runs
@pytest.fixture(scope="module")
def mot_run(trained_tiny_mot, shared_data, tmp_path_factory):
    """`mot eval` on all three tasks through the command line, with --output."""
    output = tmp_path_factory.mktemp("eval") / "results.json"
    code = cli.main(["eval", str(trained_tiny_mot), "--tasks", ",".join(TASKS), "--limit", str(LIMIT),
                     "--data_dir", str(shared_data), "--batch_size", "8", "--output", str(output)])
    assert code == 0
    return json.loads(output.read_text())


def test_mot_runs_all_tasks_and_records_groups(mot_run):
    assert set(mot_run["results"]) == set(TASKS)
    for task in TASKS:
        assert mot_run["n-samples"][task]["effective"] == LIMIT
    for value in accuracies(mot_run).values():
        assert 0.0 <= value <= 1.0
    mot = mot_run["config"]["mot"]  # written by the lm-eval model itself
    assert mot["batch_dependent"] is True and mot["batch_size"] == 8 and mot["group_size"] == 8
    assert mot["mot_routing"] == "softmax" and "group" in mot["batching"]
    assert mot_run["mot_eval"]["data_sources"]["piqa"]["release_files"][1].endswith("valid-labels.lst")
    assert mot_run["config"]["limit"] == LIMIT


def test_mot_task_scores_do_not_depend_on_other_tasks(mot_run, trained_tiny_mot, shared_data, tmp_path):
    """Batches are formed per task, so piqa alone scores exactly as piqa inside the three-task run."""
    model, tokenizer = load_model_and_tokenizer(trained_tiny_mot)
    alone = run_tasks(model, tokenizer, ["piqa"], limit=LIMIT, batch_size=8, data_dir=str(shared_data),
                      cache_dir=tmp_path)
    assert alone["results"]["piqa"] == mot_run["results"]["piqa"]


def test_mot_padding_never_mixes(trained_tiny_mot, novels_text):
    """Right padding is masked: widening every row's padding (by lengthening one row's continuation past all
    others) leaves the other rows' log-likelihoods unchanged, though they share MoT groups with that row."""
    from mixture_of_tokens.evaluation.lm_eval_model import MoTLM

    model, tokenizer = load_model_and_tokenizer(trained_tiny_mot)
    lm = MoTLM(model, tokenizer=tokenizer, batch_size=8)
    sentences = [s.strip() for s in novels_text[:20000].split(".") if len(s.split()) > 6][:8]
    requests = []
    for sentence in sentences:
        ids = tokenizer(sentence, add_special_tokens=False)["input_ids"][:30]
        requests.append(((sentence, ""), ids[:-3], ids[-3:]))
    longest = max(range(8), key=lambda i: len(requests[i][1]) + len(requests[i][2]))
    before = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    text, context, continuation = requests[longest]
    requests[longest] = (text, context, continuation + continuation * 10)
    after = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    for row in range(8):
        if row != longest:
            assert math.isclose(before[row][0], after[row][0], rel_tol=1e-5, abs_tol=1e-5), row


def test_discrete_routing_option(trained_tiny_mot, shared_data, tmp_path):
    output = tmp_path / "discrete.json"
    assert cli.main(["eval", str(trained_tiny_mot), "--tasks", "arc_easy", "--limit", str(LIMIT), "--data_dir",
                     str(shared_data), "--mot_routing", "discrete", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["config"]["mot"]["mot_routing"] == "discrete"
    assert results["config"]["mot"]["batch_size"] == 8  # default: the model's group_size
    assert 0.0 <= results["results"]["arc_easy"]["acc,none"] <= 1.0


@pytest.mark.parametrize("mlp_type", ["dense", "token_choice"])
def test_batch_independent_models_match_stock_hf(trained_tiny_mot, shared_data, tmp_path, mlp_type):
    """The MoT checkpoint read as dense / Token Choice (same parameter names): batch size 1 and 8 and the stock
    `hf` lm-eval model all give identical scores."""
    # A dense block has no router/w1/w2, so the "dense" variant's last two FFNs are freshly initialised: fine here,
    # where only batch independence is tested.
    overrides = {"mlp_types": ["dense", "dense", mlp_type, mlp_type]}
    model, tokenizer = load_model_and_tokenizer(trained_tiny_mot, config_overrides=overrides)
    # piqa and arc_easy keep the three runs short (hellaswag's long contexts at batch size 1 cost most).
    prepared = prepare_tasks(["piqa", "arc_easy"], str(shared_data), cache_dir=tmp_path)
    runs = {
        (backend, batch): run_tasks(model, tokenizer, prepared, limit=LIMIT, batch_size=batch, backend=backend)
        for backend, batch in (("mot", 1), ("mot", 8), ("hf", 8))
    }
    reference = accuracies(runs[("hf", 8)])
    for key, results in runs.items():
        assert accuracies(results) == reference, key
    assert runs[("mot", 8)]["config"]["mot"]["batch_dependent"] is False


# ----------------------------------------------------------------------------------------------- perplexity, card
def test_perplexity_and_update_card(trained_tiny_mot, novels_text, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(trained_tiny_mot, model_dir)
    text_file = tmp_path / "held_out.txt"
    text_file.write_text(novels_text[-30000:], encoding="utf-8")
    output = tmp_path / "ppl.json"
    assert cli.main(["eval", str(model_dir), "--perplexity", str(text_file), "--block_size", "64", "--output",
                     str(output), "--update_card"]) == 0
    ppl = json.loads(output.read_text())["mot_eval"]["perplexity"]
    assert ppl["block_size"] == 64 and ppl["batch_size"] == 8 and ppl["group_size"] == 8
    assert ppl["predicted_tokens"] == ppl["blocks"] * 63
    assert math.isclose(ppl["perplexity"], math.exp(ppl["loss"]), rel_tol=1e-9)
    assert 1.0 < ppl["perplexity"] < 2048  # a trained model beats uniform guessing over its 2048-token vocabulary
    assert "Perplexity" in capsys.readouterr().err  # the progress bar

    # Cross-check the loss with the model's own loss on the first batch of blocks, packed as training packs.
    from mixture_of_tokens.data import DataArguments, load_raw_text, pack_blocks

    model, tokenizer = load_model_and_tokenizer(model_dir)
    args = DataArguments(dataset=str(text_file), validation_split_percentage=0, block_size=64)
    raw = load_raw_text(args)
    blocks = pack_blocks(raw.train, tokenizer, args, 64, raw.rows_are_lines, "check").with_format("torch")["input_ids"]
    assert len(blocks) == ppl["blocks"]
    if len(blocks) % 8 == 0:
        with torch.no_grad():
            losses = [float(model(input_ids=blocks[i : i + 8], labels=blocks[i : i + 8]).loss)
                      for i in range(0, len(blocks), 8)]
        assert math.isclose(sum(losses) / len(losses), ppl["loss"], rel_tol=1e-4)

    stored = json.loads((model_dir / "eval_results.json").read_text())
    assert stored["metadata"]["perplexity"] == round(ppl["perplexity"], 4)


def test_update_card_stores_task_scores(mot_run, trained_tiny_mot, shared_data, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(trained_tiny_mot, model_dir)
    assert cli.main(["eval", str(model_dir), "--tasks", "piqa", "--limit", str(LIMIT), "--data_dir",
                     str(shared_data), "--update_card"]) == 0
    stored = json.loads((model_dir / "eval_results.json").read_text())
    assert stored["results"]["piqa"] == mot_run["results"]["piqa"]
    assert stored["metadata"]["batch_size"] == 8 and stored["metadata"]["group_size"] == 8
    assert stored["metadata"]["data"] == "local release files"
    if (model_dir / "README.md").exists():  # the card module (issue 6) renders the scores
        assert "piqa" in (model_dir / "README.md").read_text().lower()


# ----------------------------------------------------------------------------------------------- bad input
def run_cli_error(argv, capsys) -> str:
    assert cli.main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("mot eval: error:"), err
    return err


def test_bad_inputs_give_one_clear_error(trained_tiny_mot, shared_data, tmp_path, capsys):
    err = run_cli_error([str(trained_tiny_mot), "--tasks", "piqa,winogrand", "--data_dir", str(shared_data)], capsys)
    assert "'winogrand'" in err and "arc_easy" in err
    err = run_cli_error([str(trained_tiny_mot), "--tasks", "no_such_task_xyz"], capsys)
    assert "'no_such_task_xyz'" in err

    partial = tmp_path / "data"
    (partial / "piqa").mkdir(parents=True)
    shutil.copy(shared_data / "piqa" / "valid.jsonl", partial / "piqa")
    err = run_cli_error([str(trained_tiny_mot), "--tasks", "piqa", "--data_dir", str(partial)], capsys)
    assert "piqa/valid-labels.lst" in err

    missing = tmp_path / "no_model_here"
    err = run_cli_error([str(missing), "--tasks", "piqa", "--data_dir", str(shared_data)], capsys)
    assert str(missing) in err and "does not exist" in err


def test_offline_without_data_stops_in_one_line_and_mot_eval_data_is_the_offline_way(trained_tiny_mot, shared_data,
                                                                                     tmp_path):
    """No network (HF_HUB_OFFLINE=1 here): one line naming the dataset and the offline way, within seconds, before
    the model loads; with MOT_EVAL_DATA set, the same command runs on the release files."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("MOT_EVAL_DATA", None)
    command = [sys.executable, "-m", "mixture_of_tokens.cli", "eval", str(trained_tiny_mot), "--tasks", "piqa",
               "--limit", "4"]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "piqa" in lines[0] and "--data_dir" in lines[0] and "MOT_EVAL_DATA" in lines[0]
    assert time.monotonic() - start < 60
    result = subprocess.run(command + ["--output", str(tmp_path / "scores.json")], capture_output=True, text=True,
                            env={**env, "MOT_EVAL_DATA": str(shared_data)}, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "piqa" in json.loads((tmp_path / "scores.json").read_text())["results"]


def test_continuation_longer_than_the_context_window(trained_tiny_mot, novels_text):
    """HFLM stops with an assertion here; MoTLM scores the continuation's last max_length tokens."""
    from mixture_of_tokens.evaluation.lm_eval_model import MoTLM

    model, tokenizer = load_model_and_tokenizer(trained_tiny_mot)
    lm = MoTLM(model, tokenizer=tokenizer, batch_size=8)
    ids = tokenizer(novels_text[:5000], add_special_tokens=False)["input_ids"][:150]
    too_long = (("", ""), ids[:5], ids[5:])  # 145 continuation tokens, max_length is 128
    fitted = (("", ""), ids[:17], ids[17:])
    (long_score, _), (fitted_score, _) = lm._loglikelihood_tokens([too_long, fitted], disable_tqdm=True)
    assert math.isfinite(long_score) and long_score == pytest.approx(fitted_score, abs=1e-4)
