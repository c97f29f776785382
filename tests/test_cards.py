"""Model cards of real `mot train`, `mot convert` and `mot transition` output folders (issue 14, point 2).

One tiny `mot train` run on the bundled pydoc text (a few steps, seconds) is shared by the module; every card is
rendered by the command a user runs and checked as text: the recipe read from training_args.json, who trained the
weights, no group-size row where groups mean nothing, and no local path anywhere in README.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from mixture_of_tokens import MoTConfig
from mixture_of_tokens.cli import main as mot
from mixture_of_tokens.data import DEFAULT_SOURCE
from mixture_of_tokens.folders.cards import _format_value, render_card

# Values a default run would not have, so that each one can only have come from the recorded arguments.
RECIPE = {"learning_rate": "0.003", "weight_decay": "0.05", "max_grad_norm": "0.7", "adam_beta2": "0.98",
          "seed": "3", "gradient_accumulation_steps": "2", "per_device_train_batch_size": "8",
          "block_size": "32", "max_steps": "3", "warmup_steps": "1", "lr_scheduler_type": "cosine_with_min_lr"}


def card_text(folder: Path) -> str:
    return (folder / "README.md").read_text(encoding="utf-8")


def row(name: str, value: str) -> str:
    return f"| {name} | {value} |"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real `mot train` output folder: tiny-mot shrunk further, 3 steps on the bundled pydoc text."""
    folder = tmp_path_factory.mktemp("cards") / "tiny-run"
    assert mot([
        "train", "--output_dir", str(folder), "--preset", "tiny-mot", "--train_tokenizer", "300",
        "--tokenizer_training_chars", "50000", "--hidden_size", "64", "--expert_size", "64",
        "--intermediate_size", "128", "--max_train_blocks", "64", "--validation_split_percentage", "0",
        "--eval_strategy", "no", "--save_steps", RECIPE["max_steps"], "--logging_steps", "1",
        "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
        *[item for name in ("block_size", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                            "learning_rate", "warmup_steps", "weight_decay", "max_grad_norm", "adam_beta2", "seed")
          for item in (f"--{name}", RECIPE[name])],
    ]) == 0
    return folder


@pytest.fixture(scope="module")
def converted(trained, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cards-convert") / "tiny-tc"
    assert mot(["convert", str(trained), str(folder), "--to", "token_choice"]) == 0
    return folder


def assert_no_local_path(text: str, *folders: Path) -> None:
    for folder in folders:
        for path in {str(folder), str(folder.resolve()), str(folder.parent), str(folder.resolve().parent)}:
            assert path not in text, path


def test_card_of_a_mot_train_folder_shows_its_recipe(trained, capsys):
    arguments = json.loads((trained / "training_args.json").read_text())
    assert set(arguments) >= {"model_args", "data_args", "training_args"}  # `mot train` nests them
    assert mot(["card", str(trained)]) == 0
    text = card_text(trained)
    assert "No training arguments were saved" not in text
    recorded = {**arguments["data_args"], **arguments["training_args"]}
    for name, value in RECIPE.items():
        assert recorded[name] is not None and _format_value(recorded[name]) == value, name  # what the file holds
        assert row(name, value) in text, name
    for name in ("adam_beta1", "optim", "max_train_blocks"):
        assert row(name, _format_value(recorded[name])) in text
    assert row("lr_scheduler_kwargs", "min_lr_rate=0.1") in text  # the cosine floor, not a Python dict
    assert row("dataset", DEFAULT_SOURCE) in text  # `--dataset` not given: the bundled text
    assert row("precision", "fp32") in text
    assert row("steps trained", RECIPE["max_steps"]) in text  # from the last checkpoint's trainer_state.json
    assert "num_train_epochs" not in text  # ignored by Trainer when max_steps is set
    assert row("group size G", str(MoTConfig.from_pretrained(trained).group_size)) in text  # MoT: groups exist
    assert_no_local_path(text, trained)


def test_converted_token_choice_card_has_the_source_recipe_and_no_local_path(trained, converted):
    # The conversion only changes the config: the weights' recipe is the source's, and it travels with them.
    assert (converted / "training_args.json").read_bytes() == (trained / "training_args.json").read_bytes()
    text = card_text(converted)
    for name, value in RECIPE.items():
        assert row(name, value) in text, name
    flat = " ".join(text.split())
    assert "Trained as its source, then converted from a local model by `mot convert`" in flat
    assert "converted (not yet transition-tuned)" in flat
    assert "group size G" not in text  # Token Choice does not group sequences
    assert row("experts per token k", "1") in text
    assert_no_local_path(text, trained, converted)
    card = ModelCard.load(converted / "README.md")
    assert card.data.base_model is None  # a local folder is no Hub base model
    # The record itself keeps the path for the author (`mot push` strips it from the uploaded copy).
    assert json.loads((converted / "conversion.json").read_text())["base_model"] == str(trained)


def test_converted_card_names_a_hub_base_model(converted, tmp_path):
    """A source recorded under a Hub repo id is named, in the metadata and the text; so is the trainer of a chain
    of plain conversions."""
    folder = tmp_path / "named"
    shutil.copytree(converted, folder)
    record = json.loads((folder / "conversion.json").read_text())
    record.update(base_model="org/tiny-mot")
    (folder / "conversion.json").write_text(json.dumps(record))
    assert mot(["card", str(folder)]) == 0
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "org/tiny-mot"
    assert "Trained as `org/tiny-mot`, then converted by `mot convert`" in " ".join(card.text.split())

    # Converted back to MoT: still no training since `org/tiny-mot`.
    back = tmp_path / "back"
    assert mot(["convert", str(folder), str(back), "--to", "mot"]) == 0
    text = " ".join(card_text(back).split())
    assert "Trained as `org/tiny-mot`, then converted" in text and row("max_steps", RECIPE["max_steps"]) in text
    assert_no_local_path(card_text(back), folder, back)


def test_transition_card_shows_the_continued_training(trained, tmp_path):
    destination = tmp_path / "transitioned"
    assert mot(["transition", str(trained), str(destination), "--steps", "2", "--report_to", "none",
                "--disable_tqdm", "true"]) == 0
    arguments = json.loads((destination / "training_args.json").read_text())
    assert arguments["training_args"]["max_steps"] == 2  # its own record, not the source's
    text = card_text(destination)
    flat = " ".join(text.split())
    assert "Converted from a local model and trained 2 more steps (transition tuning, continuing the optimizer" in flat
    assert row("max_steps", "2") in text and row("learning_rate", RECIPE["learning_rate"]) in text  # inherited
    assert row("steps trained", "2") in text
    assert "group size G" not in text
    assert_no_local_path(text, trained, destination)


@pytest.mark.parametrize(("mlp_types", "grouped"), [
    (["dense", "dense", "token_choice", "token_choice"], False),
    (["dense", "dense", "expert_choice", "expert_choice"], True),
    (["dense", "dense", "mot", "mot"], True),
    (["dense", "token_choice", "expert_choice", "mot"], True),
])
def test_group_size_only_for_families_that_group(tmp_path, mlp_types, grouped):
    MoTConfig.from_preset("tiny-mot", mlp_types=mlp_types).save_pretrained(tmp_path)
    text = render_card(tmp_path).text
    assert ("| group size G |" in text) == grouped
    assert ("| experts per token k |" in text) == bool({"token_choice", "expert_choice"} & set(mlp_types))


def test_flat_and_hand_written_records_still_read(tmp_path):
    """Older folders hold TrainingArguments names at the top level; a local dataset is named by its file only."""
    MoTConfig.from_preset("tiny-mot").save_pretrained(tmp_path)
    (tmp_path / "training_args.json").write_text(json.dumps({
        "learning_rate": 0.0007, "max_steps": 150000, "num_train_epochs": 3.0, "warmup_steps": 2500 / 150000,
        "bf16": True, "dataset": "/home/someone/private/novels.txt.gz"}))
    text = render_card(tmp_path).text
    assert row("learning_rate", "0.0007") in text and row("max_steps", "150000") in text
    assert row("warmup_steps", "0.01667 (a fraction of the steps)") in text
    assert row("precision", "bf16 autocast, fp32 weights (bf16)") in text
    assert row("dataset", "local data `novels.txt.gz`") in text and "/home/someone" not in text
    assert "num_train_epochs" not in text

    (tmp_path / "training_args.json").write_text(json.dumps({"data_args": {"dataset": "allenai/c4"},
                                                            "training_args": {"learning_rate": 0.001}}))
    text = render_card(tmp_path).text
    assert row("dataset", "allenai/c4") in text and row("learning_rate", "0.001") in text


def run_failing(capsys, argv) -> str:
    capsys.readouterr()
    assert mot(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"mot {argv[0]}: error:") and "\n" not in error and "Traceback" not in error
    return error


def test_broken_training_args_is_one_clear_line(converted, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(converted, source)
    (source / "training_args.json").write_text("{not json")
    assert "training_args.json is not valid JSON" in run_failing(capsys, ["card", str(source)])
    # `mot convert` checks it before writing anything
    error = run_failing(capsys, ["convert", str(source), str(tmp_path / "out"), "--to", "mot"])
    assert "training_args.json is not valid JSON" in error
    assert not (tmp_path / "out").exists()
