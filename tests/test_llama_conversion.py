"""`mot convert LLAMA_DIR OUT --to dense|mot|token_choice`: our modern block is a Llama block (logits equal to
transformers' own `LlamaForCausalLM`), and a Llama model upcycles into MoT / Token Choice."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import mixture_of_tokens  # noqa: F401  (registers the Auto classes)
from mixture_of_tokens.cli import main as mot

VOCAB = 211


def tiny_llama(tmp_path, **overrides):
    settings = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-5,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    settings.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a mapping mistake shows
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                parameter.normal_(0, 0.1)
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    return model, folder


def convert(src, dst, *flags):
    assert mot(["convert", str(src), str(dst), *flags]) == 0
    return AutoModelForCausalLM.from_pretrained(dst).eval()


def inputs(batch=3, length=12, pad=(0, 4, 7)):
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row, count in enumerate(pad[:batch]):
        mask[row, :count] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("overrides", [
    {},
    {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 4},
    {"tie_word_embeddings": True, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}},
])
def test_dense_conversion_gives_the_llama_models_logits(tmp_path, overrides):
    llama, folder = tiny_llama(tmp_path, **overrides)
    ours = convert(folder, tmp_path / "dense", "--to", "dense")
    assert ours.config.model_type == "mot" and set(ours.config.mlp_types) == {"dense"}
    ids, mask = inputs()
    with torch.no_grad():
        plain = ids[:1, :8]
        torch.testing.assert_close(ours(plain).logits, llama(plain).logits, atol=1e-4, rtol=1e-4)
        theirs, mine = llama(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(mine[real], theirs[real], atol=1e-4, rtol=1e-4)
        # With the cache: greedy generation from left-padded prompts, token for token.
        expected = llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(got, expected)


def test_upcycled_mot_and_token_choice_start_from_the_llama_ffn(tmp_path):
    llama, folder = tiny_llama(tmp_path)
    token_choice = convert(folder, tmp_path / "tc", "--to", "token_choice", "--routed_layers", "2,3",
                           "--group_size", "4", "--num_experts", "4")
    assert token_choice.config.mlp_types == ["dense", "dense", "token_choice", "token_choice"]
    # Every expert is a copy of the block's FFN: top-1 Token Choice then computes gate * FFN(x), whatever the
    # router says, so the block output is the Llama block's with the FFN scaled by the router probability.
    layer = token_choice.model.layers[2].mlp
    x = torch.randn(5, 64)
    reference = llama.model.layers[2].mlp(x)
    for expert in range(4):
        torch.testing.assert_close(layer.experts.process_one(expert, x), reference, atol=1e-5, rtol=1e-5)
    mot_model = convert(folder, tmp_path / "mot", "--to", "mot", "--group_size", "4", "--expert_size", "48")
    assert mot_model.config.mlp_types == ["dense", "dense", "mot", "mot"] and mot_model.config.expert_size == 48
    # Two slices of the FFN's 96 hidden units: the sum of expert 0 and expert 1 is the whole FFN.
    layer = mot_model.model.layers[3].mlp
    torch.testing.assert_close(layer.experts.process_one(0, x) + layer.experts.process_one(1, x), llama.model.layers[3].mlp(x),
                               atol=1e-5, rtol=1e-5)
    ids, _ = inputs(batch=4, pad=())
    with torch.no_grad():
        assert torch.isfinite(mot_model(ids).logits).all()
    lineage = json.loads((tmp_path / "mot" / "conversion.json").read_text())
    assert lineage["base_model_type"] == "llama" and lineage["method"] == "llama_to_mot"
    assert sorted(lineage["fresh_tensors"]) == ["model.layers.2.mlp.gate.weight", "model.layers.3.mlp.gate.weight"]
    card = (tmp_path / "mot" / "README.md").read_text()
    assert "llama" in card.lower()


@pytest.mark.parametrize("overrides, message", [
    ({"head_dim": 32}, "head_dim=32"),
    ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
])
def test_unsupported_llama_features_are_refused_with_one_line(tmp_path, capsys, overrides, message):
    _, folder = tiny_llama(tmp_path, **overrides)
    capsys.readouterr()  # saving the Llama model draws a progress bar
    assert mot(["convert", str(folder), str(tmp_path / "out"), "--to", "dense"]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unknown_rope_type_and_bad_flags_are_refused(tmp_path, capsys):
    _, folder = tiny_llama(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "spiral", "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    assert mot(["convert", str(folder), str(tmp_path / "out"), "--to", "dense"]) == 2
    assert "spiral" in capsys.readouterr().err
    _, folder = tiny_llama(tmp_path / "again")
    assert mot(["convert", str(folder), str(tmp_path / "out"), "--to", "mot", "--expert_size", "50"]) == 2
    assert "must divide the Llama intermediate_size 96" in capsys.readouterr().err
    assert mot(["convert", str(folder), str(tmp_path / "out"), "--to", "mot", "--routed_layers", "7"]) == 2
    assert "--routed_layers 7" in capsys.readouterr().err
