"""`mot generate`: single-prompt generation, batches, the MoT batch warning, bad inputs; MoT KV-cache agreement."""

from __future__ import annotations

import pytest
import torch

from mixture_of_tokens import MoTForCausalLM
from mixture_of_tokens.cli import main as mot


@pytest.fixture(scope="module")
def model_folders(tiny_model_folder, tiny_tokenizer):
    """Untrained tiny MoT and Token Choice folders with the novels tokenizer (generation needs no training)."""
    return {name: tiny_model_folder(name, tokenizer=tiny_tokenizer, max_position_embeddings=32,
                                    mlp_types=["dense", "dense", name, name]) for name in ("mot", "token_choice")}


def test_token_choice_streams_one_prompt(model_folders, capsys):
    assert mot(["generate", str(model_folders["token_choice"]), "--prompt", "It was a dark night",
                "--max_new_tokens", "5", "--stream"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("It was a dark night") and len(captured.out) > len("It was a dark night")
    assert "Mixture of Tokens" not in captured.err


def test_mot_warns_once_about_the_batch_and_generates_a_batch(model_folders, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("It was a dark night\nShe said\nThe house on the hill\n")
    assert mot(["generate", str(model_folders["mot"]), "--prompts_file", str(prompts), "--max_new_tokens", "4",
                "--do_sample", "--seed", "1", "--mot_routing", "discrete"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("depends on which prompts are generated together") == 1
    assert [line for line in captured.out.splitlines() if line.startswith("===")] == ["=== 1 ===", "=== 2 ===",
                                                                                     "=== 3 ==="]


def run_failing(capsys, argv) -> str:
    capsys.readouterr()
    assert mot(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("mot generate: error:")
    return error


def test_bad_inputs(model_folders, tmp_path, capsys):
    error = run_failing(capsys, ["generate", str(model_folders["token_choice"]), "--prompt", "word " * 40])
    assert "context is 32 tokens" in error
    assert "does not exist" in run_failing(capsys, ["generate", str(tmp_path / "nope"), "--prompt", "x"])
    assert "no prompt" in run_failing(capsys, ["generate", str(model_folders["mot"])])
    assert "--stream" in run_failing(capsys, ["generate", str(model_folders["mot"]), "--prompt", "a", "--prompt",
                                             "b", "--stream"])


def test_mot_cached_generation_equals_uncached_forward(model_folders, tiny_tokenizer):
    """With a KV cache each decoding step groups the batch's tokens of that step as the full forward groups the
    same columns: cached greedy decoding and one uncached forward over the result agree (docs/design.md, "Batch dependence")."""
    model = MoTForCausalLM.from_pretrained(model_folders["mot"]).eval()
    texts = ["It was a dark night", "She said", "The house on the hill above", "Call me", "A letter",
             "He had never seen such", "In the morning", "They walked"]  # one full group of 8, left-padded
    batch = tiny_tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=6, do_sample=False, output_scores=True,
                                   return_dict_in_generate=True, pad_token_id=tiny_tokenizer.pad_token_id)
        sequences = generated.sequences
        mask = torch.cat([batch["attention_mask"], torch.ones_like(sequences[:, batch["input_ids"].shape[1]:])], 1)
        logits = model(input_ids=sequences, attention_mask=mask, use_cache=False).logits
    prompt_len = batch["input_ids"].shape[1]
    uncached = logits[:, prompt_len - 1 : -1]  # the logits that chose each generated token
    cached = torch.stack(generated.scores, dim=1)
    torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)
    assert torch.equal(uncached.argmax(-1), sequences[:, prompt_len:])
