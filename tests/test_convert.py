"""`mot convert` (MoT <-> Token Choice by a config change) and `mot transition` (transition tuning)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixture_of_tokens import MoTConfig, MoTForCausalLM
from mixture_of_tokens.cli import main as mot
from mixture_of_tokens.conversion.convert import CONVERSION_FILE, SET_ASIDE_FILE


def tensors(folder):
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def token_choice_folder(trained_tiny_mot, tmp_path_factory):
    dst = tmp_path_factory.mktemp("convert") / "tc"
    assert mot(["convert", str(trained_tiny_mot), str(dst), "--to", "token_choice"]) == 0
    return dst


def test_conversion_changes_only_the_config(trained_tiny_mot, token_choice_folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(token_choice_folder)
    assert isinstance(model, MoTForCausalLM)
    source_types = MoTConfig.from_pretrained(trained_tiny_mot).mlp_types
    assert model.config.mlp_types == ["token_choice" if t == "mot" else t for t in source_types]
    assert "token_choice" in model.config.mlp_types and "dense" in model.config.mlp_types

    source, converted = tensors(trained_tiny_mot), tensors(token_choice_folder)
    assert source.keys() == converted.keys()
    for name, tensor in source.items():
        assert converted[name].dtype == tensor.dtype and torch.equal(converted[name], tensor), name
    # ... and the loaded model holds exactly those tensors
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, source[name]), name

    # tokenizer, code files (remote code) and lineage come along
    tokenizer = AutoTokenizer.from_pretrained(token_choice_folder)
    assert tokenizer("It was a dark night")["input_ids"] == AutoTokenizer.from_pretrained(trained_tiny_mot)(
        "It was a dark night")["input_ids"]
    assert (token_choice_folder / "modeling_mot.py").is_file()
    assert (token_choice_folder / "configuration_mot.py").is_file()
    lineage = json.loads((token_choice_folder / CONVERSION_FILE).read_text())
    assert lineage["base_model"] == str(trained_tiny_mot)
    assert lineage["base_model_mlp_types"] == source_types
    card = (token_choice_folder / "README.md").read_text()  # the model card: converted, not yet tuned
    assert "converted (not yet transition-tuned)" in " ".join(card.split())

    back = tmp_path / "back"
    assert mot(["convert", str(token_choice_folder), str(back), "--to", "mot"]) == 0
    assert MoTConfig.from_pretrained(back).mlp_types == source_types
    round_trip = tensors(back)
    assert all(torch.equal(round_trip[name], tensor) for name, tensor in source.items())


def test_top_k_and_capacity_factor_are_set(trained_tiny_mot, tmp_path):
    dst = tmp_path / "tc2"
    assert mot(["convert", str(trained_tiny_mot), str(dst), "--top_k", "2", "--capacity_factor", "2.0"]) == 0
    config = MoTConfig.from_pretrained(dst)
    assert (config.num_experts_per_tok, config.capacity_factor) == (2, 2.0)


def test_learnable_temperature_survives_the_round_trip(tmp_path):
    """Token Choice has no place for MoT's learned temperature: it is set aside and restored on the way back."""
    source = tmp_path / "src"
    config = MoTConfig.from_preset("tiny-mot", learnable_temperature="per_expert")
    model = MoTForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.mlp_type == "mot":
                layer.mlp.log_temperature.uniform_(-1, 1)
    model.save_pretrained(source)
    assert mot(["convert", str(source), str(tmp_path / "tc")]) == 0
    assert (tmp_path / "tc" / SET_ASIDE_FILE).is_file()
    assert not any("log_temperature" in name for name in tensors(tmp_path / "tc"))
    assert mot(["convert", str(tmp_path / "tc"), str(tmp_path / "back"), "--to", "mot"]) == 0
    original, restored = tensors(source), tensors(tmp_path / "back")
    assert original.keys() == restored.keys()
    assert all(torch.equal(restored[name], tensor) for name, tensor in original.items())


def run_failing(capsys, argv) -> str:
    """Run `mot ARGV`, expect exit status 2 and return the one error message."""
    capsys.readouterr()  # drop what earlier steps printed (progress bars)
    assert mot(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"mot {argv[0]}: error:") and "\n" not in error and "Traceback" not in error
    return error


def test_bad_inputs(trained_tiny_mot, token_choice_folder, tmp_path, capsys):
    assert "does not exist" in run_failing(capsys, ["convert", str(tmp_path / "nope"), str(tmp_path / "out")])
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert "--overwrite" in run_failing(capsys, ["convert", str(trained_tiny_mot), str(existing)])
    assert (existing / "keep.txt").read_text() == "mine"  # refused: nothing touched
    error = run_failing(capsys, ["convert", str(trained_tiny_mot), str(tmp_path / "out"), "--top_k", "9"])
    assert "--top_k 9" in error and "8 experts" in error
    assert not (tmp_path / "out").exists()

    dense = tmp_path / "dense"
    MoTForCausalLM(MoTConfig.from_preset("tiny-dense")).save_pretrained(dense)
    assert "dense model" in run_failing(capsys, ["convert", str(dense), str(tmp_path / "out")])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "'gpt2'" in run_failing(capsys, ["convert", str(foreign), str(tmp_path / "out")])
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'expert_choice' (choose from ...)"
        mot(["convert", str(trained_tiny_mot), str(tmp_path / "out"), "--to", "expert_choice"])

    assert mot(["convert", str(trained_tiny_mot), str(existing), "--overwrite"]) == 0
    assert not (existing / "keep.txt").exists() and (existing / "model.safetensors").is_file()


def test_token_choice_is_batch_invariant(token_choice_folder):
    """A prompt alone and inside a left-padded batch of 8: same logits (1e-5) and the same greedy continuation."""
    model = AutoModelForCausalLM.from_pretrained(token_choice_folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(token_choice_folder, padding_side="left")
    prompt = "It was the best of times, it was the"
    others = ["Call me", "The house stood on a hill above the river, and", "She said", "In the morning the rain",
              "He had never seen", "A letter came for", "They walked slowly along the old road towards the"]
    alone = tokenizer([prompt], return_tensors="pt")
    batch = tokenizer(others[:3] + [prompt] + others[3:], return_tensors="pt", padding=True)
    length = alone["input_ids"].shape[1]
    with torch.no_grad():
        logits_alone = model(**alone).logits[0]
        logits_batch = model(**batch).logits[3, -length:]
        torch.testing.assert_close(logits_batch, logits_alone, atol=1e-5, rtol=1e-5)
        settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        continuation_alone = model.generate(**alone, **settings)[0, length:]
        continuation_batch = model.generate(**batch, **settings)[3, batch["input_ids"].shape[1]:]
    assert torch.equal(continuation_alone, continuation_batch)


# ----------------------------------------------------------------------------------------------------------------
# transition tuning on real text

SOURCE_STEPS, TRANSITION_STEPS = 80, 8  # the paper's ratio: ~10% more steps after the switch
PEAK_LR = 1e-2


def eval_loss(folder, blocks: torch.Tensor) -> float:
    """Mean LM loss of the model in `folder` on fixed blocks, in batches of full groups (eval mode)."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        losses = [model(input_ids=batch, labels=batch).loss for batch in blocks.split(model.config.group_size)]
    return torch.stack(losses).mean().item()


def test_transition_continues_optimizer_and_recovers_from_the_switch(tmp_path, novels_text, tiny_tokenizer,
                                                                      capsys):
    train_text = tmp_path / "novels.txt"
    train_text.write_text(novels_text[:200_000], encoding="utf-8")
    tokenizer_dir = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(tokenizer_dir)
    source = tmp_path / "mot"
    assert mot([
        "train", "--output_dir", str(source), "--dataset", str(train_text), "--tokenizer", str(tokenizer_dir),
        "--preset", "tiny-mot", "--hidden_size", "64", "--intermediate_size", "128", "--num_experts", "4",
        "--expert_size", "128", "--group_size", "4", "--max_position_embeddings", "64", "--block_size", "32",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--learning_rate", str(PEAK_LR),
        "--warmup_steps", "5", "--max_steps", str(SOURCE_STEPS), "--save_steps", str(SOURCE_STEPS),
        "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
        "--dataloader_num_workers", "0",
    ]) == 0

    held_out = torch.tensor(tiny_tokenizer(novels_text[300_000:340_000])["input_ids"][: 32 * 32]).view(32, 32)
    converted = tmp_path / "switched"
    assert mot(["convert", str(source), str(converted)]) == 0
    before_switch, after_switch = eval_loss(source, held_out), eval_loss(converted, held_out)
    assert after_switch > before_switch  # the paper's jump at the switch

    capsys.readouterr()
    destination = tmp_path / "tc"
    assert mot(["transition", str(source), str(destination), "--steps", str(TRANSITION_STEPS),
                "--logging_steps", "1"]) == 0
    messages = capsys.readouterr().err
    assert f"checkpoint-{SOURCE_STEPS}" in messages and "learning_rate" in messages  # what was continued, reused
    after_transition = eval_loss(destination, held_out)
    assert after_transition < after_switch, (before_switch, after_switch, after_transition)

    # The optimizer state was carried: Adam's step count continues from the source run.
    checkpoint = destination / f"checkpoint-{TRANSITION_STEPS}"
    adam = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert {int(state["step"]) for state in adam["state"].values()} == {SOURCE_STEPS + TRANSITION_STEPS}
    # ... and so was the schedule: the first LR after the switch is near the source schedule's end, no warm-up.
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    first_lr = next(entry["learning_rate"] for entry in history if "learning_rate" in entry)
    assert PEAK_LR * 0.1 < first_lr < PEAK_LR * 0.2  # cosine to 0.1x, near its end
    assert MoTConfig.from_pretrained(destination).mlp_types.count("token_choice") == 2
    lineage = json.loads((destination / CONVERSION_FILE).read_text())
    assert lineage["method"] == "transition" and lineage["source_steps"] == SOURCE_STEPS


def test_transition_without_checkpoint_starts_fresh_and_says_so(trained_tiny_mot, tmp_path, novels_text, capsys):
    train_text = tmp_path / "novels.txt"
    train_text.write_text(novels_text[:40_000], encoding="utf-8")
    capsys.readouterr()
    assert mot(["transition", str(trained_tiny_mot), str(tmp_path / "tc"), "--steps", "2",
                "--dataset", str(train_text), "--per_device_train_batch_size", "8",
                "--per_device_eval_batch_size", "8", "--block_size", "32",
                "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
                "--dataloader_num_workers", "0"]) == 0
    assert "starting a fresh optimizer" in capsys.readouterr().err
    adam = torch.load(tmp_path / "tc" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert {int(state["step"]) for state in adam["state"].values()} == {2}
    error = run_failing(capsys, ["transition", str(trained_tiny_mot), str(tmp_path / "tc"), "--steps", "2"])
    assert "--overwrite" in error
    error = run_failing(capsys, ["transition", str(trained_tiny_mot), str(tmp_path / "x"), "--steps", "2",
                                 "--max_steps", "5"])
    assert "--max_steps" in error


def test_transition_keyword_settings_are_the_flags_given(tiny_model_folder, tmp_path):
    """`mot transition`'s extra flags reach `transition_tune` as exactly the settings given, typed; the settings it
    sets itself are refused before anything is written."""
    from mixture_of_tokens.conversion.convert import transition_tune
    from mixture_of_tokens.training.train import given_settings
    from mixture_of_tokens.utils import UserError

    given = given_settings(["--learning_rate", "1e-3", "--no_remove_unused_columns", "--block_size", "32"])
    assert given == {"learning_rate": 1e-3, "remove_unused_columns": False, "block_size": 32}
    assert given_settings([]) == {}
    source = tiny_model_folder("source")
    for reserved in ({"max_steps": 5}, {"output_dir": str(tmp_path / "x")}):
        with pytest.raises(UserError, match=f"--{next(iter(reserved))} is set by mot transition"):
            transition_tune(source, tmp_path / "tc", steps=2, **reserved)
    with pytest.raises(UserError, match="unknown training setting 'learning_rat'"):
        transition_tune(source, tmp_path / "tc", steps=2, learning_rat=1e-3)
    assert not (tmp_path / "tc").exists()
