"""`mot convert SRC OUT --to qwen2_moe | llama`: a stock transformers folder that computes what our model computes,
loaded in a process that never imports this package; what cannot be exported is refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from mixture_of_tokens import MoTForCausalLM
from mixture_of_tokens.cli import main as mot

MODERN = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
              max_position_embeddings=64, num_experts=4, expert_size=24, group_size=2, bos_token_id=0,
              eos_token_id=0, pad_token_id=0, position_embedding_type="rope", norm_type="rmsnorm", gated_mlp=True,
              hidden_act="silu", num_hidden_layers=4)


def inputs():
    ids = torch.randint(1, 96, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: positions come from the mask
    return ids, mask


def stock_outputs(folder, tmp_path):
    """Logits (plain and left-padded) and greedy tokens of the exported folder, from a process that never imports
    mixture_of_tokens and loads without trust_remote_code."""
    ids, mask = inputs()
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        x = torch.load({str(tmp_path / "inputs.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()
        with torch.no_grad():
            out = {{"plain": model(x["ids"]).logits, "padded": model(x["ids"], attention_mask=x["mask"]).logits,
                   "tokens": model.generate(x["ids"], attention_mask=x["mask"], max_new_tokens=6, do_sample=False,
                                            pad_token_id=0)}}
        torch.save(out, {str(tmp_path / "outputs.pt")!r})
        assert "mixture_of_tokens" not in sys.modules
        print(type(model).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip(), torch.load(tmp_path / "outputs.pt")


def our_outputs(model):
    ids, mask = inputs()
    with torch.no_grad():
        return {"plain": model(ids).logits, "padded": model(ids, attention_mask=mask).logits,
                "tokens": model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)}


@pytest.mark.parametrize(("mlp_types", "top_k", "tied"), [
    (["dense", "dense", "token_choice", "token_choice"], 1, False),
    (["token_choice", "dense", "token_choice", "dense"], 2, True),
    (["token_choice"] * 4, 1, True),
])
def test_token_choice_exports_to_qwen2_moe_exactly(tmp_path, tiny_model_folder, mlp_types, top_k, tied):
    src = tiny_model_folder("src", preset=None, tokenizer=None, **MODERN, mlp_types=mlp_types,
                            num_experts_per_tok=top_k, tie_word_embeddings=tied)
    model = MoTForCausalLM.from_pretrained(src).eval()
    assert mot(["convert", str(src), str(tmp_path / "out"), "--to", "qwen2_moe"]) == 0
    out = tmp_path / "out"
    stored = json.loads((out / "config.json").read_text())
    assert stored["model_type"] == "qwen2_moe" and "auto_map" not in stored and not list(out.glob("*.py"))
    assert stored["mlp_only_layers"] == [i for i, kind in enumerate(mlp_types) if kind == "dense"]
    assert stored["norm_topk_prob"] is False
    name, theirs = stock_outputs(out, tmp_path)
    assert name == "Qwen2MoeForCausalLM"
    ours = our_outputs(model)
    real = inputs()[1].bool()
    torch.testing.assert_close(theirs["plain"], ours["plain"], rtol=0, atol=1e-4)
    torch.testing.assert_close(theirs["padded"][real], ours["padded"][real], rtol=0, atol=1e-4)
    assert torch.equal(theirs["tokens"], ours["tokens"])
    lineage = json.loads((out / "conversion.json").read_text())
    assert lineage["method"] == "export_to_qwen2_moe" and lineage["mlp_types"] == mlp_types
    card = (out / "README.md").read_text()
    assert "Qwen2MoeForCausalLM" in card and "src" in card and "trust_remote_code" in card


def test_a_dense_modern_model_exports_to_llama(tmp_path, tiny_model_folder):
    src = tiny_model_folder("src", preset=None, tokenizer=None, **MODERN, mlp_types=["dense"] * 4)
    model = MoTForCausalLM.from_pretrained(src).eval()
    assert mot(["convert", str(src), str(tmp_path / "out"), "--to", "llama"]) == 0
    name, theirs = stock_outputs(tmp_path / "out", tmp_path)
    assert name == "LlamaForCausalLM"
    ours = our_outputs(model)
    torch.testing.assert_close(theirs["plain"], ours["plain"], rtol=0, atol=1e-4)
    assert torch.equal(theirs["tokens"], ours["tokens"])


@pytest.mark.parametrize(("overrides", "to", "words"), [
    (dict(position_embedding_type="learned", norm_type="layernorm", gated_mlp=False, hidden_act="relu"),
     "qwen2_moe", "the paper's block"),
    (dict(attention_bias=True), "qwen2_moe", "attention_bias"),
    (dict(mlp_bias=True), "qwen2_moe", "mlp_bias"),
    (dict(mlp_types=["dense", "dense", "mot", "token_choice"]), "qwen2_moe", "mot transition"),
    (dict(mlp_types=["dense", "expert_choice", "dense", "dense"]), "qwen2_moe", "expert_choice"),
    (dict(mlp_types=["dense"] * 4), "qwen2_moe", "--to llama"),
    (dict(mlp_types=["dense", "dense", "token_choice", "dense"]), "llama", "--to qwen2_moe"),
])
def test_what_cannot_be_exported_is_refused_in_one_line(tmp_path, tiny_model_folder, capsys, overrides, to, words):
    fields = {**MODERN, "mlp_types": ["dense", "dense", "token_choice", "token_choice"], **overrides}
    src = tiny_model_folder("src", preset=None, tokenizer=None, **fields)
    capsys.readouterr()  # the save's progress bar
    assert mot(["convert", str(src), str(tmp_path / "out"), "--to", to]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and words in message, message
    assert not (tmp_path / "out").exists()
