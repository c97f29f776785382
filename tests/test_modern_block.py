"""The modern (Llama-style) block through the commands: `mot train`, `mot convert` / `mot transition` to Token
Choice with gated experts, `mot eval` (zero-shot and perplexity), and the card. The rest is parametrized over both
blocks where it is tested for the paper's: gradient accumulation and aux loss in test_train.py; cache, attention
implementations, gradient checkpointing and remote code in test_model.py; transformers' common tests in
test_transformers_common.py; parameter counts in test_hub.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mixture_of_tokens import MoTConfig, MoTForCausalLM
from mixture_of_tokens.cli import main as mot


@pytest.fixture(scope="module")
def modern_run(tmp_path_factory, novels_text, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("modern")
    text = folder / "novels.txt"
    text.write_text(novels_text[:120_000], encoding="utf-8")
    tiny_tokenizer.save_pretrained(folder / "tokenizer")
    source = folder / "mot"
    assert mot([
        "train", "--output_dir", str(source), "--dataset", str(text), "--tokenizer", str(folder / "tokenizer"),
        "--preset", "tiny-modern-mot", "--hidden_size", "64", "--intermediate_size", "96", "--num_experts", "4",
        "--expert_size", "96", "--group_size", "4", "--block_size", "32", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8", "--max_steps", "8", "--save_steps", "8", "--eval_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--dataloader_num_workers", "0",
    ]) == 0
    return folder, source


def test_mot_train_writes_a_modern_model_and_its_card(modern_run):
    _, source = modern_run
    config = MoTConfig.from_pretrained(source)
    assert (config.position_embedding_type, config.norm_type, config.gated_mlp) == ("rope", "rmsnorm", True)
    assert config.num_key_value_heads == 2 and config.mlp_types == ["dense", "dense", "mot", "mot"]
    assert "Llama-style blocks: pre-RMSNorm, rotary position embeddings" in (source / "README.md").read_text()


def test_convert_and_transition_keep_the_gated_experts(modern_run):
    folder, source = modern_run
    converted = folder / "tc"
    assert mot(["convert", str(source), str(converted)]) == 0
    before, after = load_file(source / "model.safetensors"), load_file(converted / "model.safetensors")
    assert before.keys() == after.keys() and any(name.endswith("mlp.experts.gate_up_proj") for name in after)
    for name in before:
        assert torch.equal(before[name], after[name]), name  # a config change only
    config = MoTConfig.from_pretrained(converted)
    assert config.mlp_types == ["dense", "dense", "token_choice", "token_choice"] and config.gated_mlp
    tuned = folder / "transition"
    assert mot(["transition", str(source), str(tuned), "--steps", "2", "--logging_steps", "1"]) == 0
    lineage = json.loads((tuned / "conversion.json").read_text())
    assert lineage["method"] == "transition"
    model = MoTForCausalLM.from_pretrained(tuned).eval()
    ids = torch.randint(3, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # Token Choice on the modern block is batch-invariant
        together = model(ids).logits
        alone = torch.cat([model(ids[i:i + 1]).logits for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_mot_eval_scores_a_modern_model(modern_run, shared_data, novels_text):
    folder, source = modern_run
    text = folder / "held_out.txt"
    text.write_text(novels_text[300_000:330_000], encoding="utf-8")
    output = folder / "eval.json"
    assert mot(["eval", str(source), "--tasks", "piqa", "--limit", "8", "--data_dir", str(shared_data),
                "--perplexity", str(text), "--block_size", "32", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    assert 0.0 <= results["results"]["piqa"]["acc,none"] <= 1.0
    assert 1.0 < results["mot_eval"]["perplexity"]["perplexity"] < 1e5


def test_modern_options_are_mot_train_flags():
    from mixture_of_tokens.training.train import build_config, parse_args

    model_args, _, _ = parse_args(["--output_dir", "unused", "--preset", "tiny-mot", "--position_embedding_type",
                                   "rope", "--norm_type", "rmsnorm", "--gated_mlp", "true", "--num_key_value_heads",
                                   "2", "--attention_bias", "true", "--mlp_bias", "true", "--tie_word_embeddings",
                                   "true", "--hidden_act", "silu"])
    config = build_config(model_args)
    assert (config.position_embedding_type, config.norm_type, config.gated_mlp, config.num_key_value_heads) == (
        "rope", "rmsnorm", True, 2)
    assert config.attention_bias and config.mlp_bias and config.tie_word_embeddings
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}


def test_deploy_path_mot_to_transition_to_qwen2_moe(modern_run, tmp_path):
    """The README's deploy path at quick-start size: a trained MoT, `mot transition`, `mot convert --to qwen2_moe`,
    then the folder served by stock transformers in a process that never imports this package."""
    import subprocess
    import sys
    import textwrap

    folder, source = modern_run
    tuned, served = tmp_path / "tuned", tmp_path / "served"
    assert mot(["transition", str(source), str(tuned), "--steps", "2", "--logging_steps", "1"]) == 0
    assert mot(["convert", str(tuned), str(served), "--to", "qwen2_moe"]) == 0
    assert (served / "tokenizer.json").is_file() and json.loads((served / "config.json").read_text())[
        "model_type"] == "qwen2_moe"
    model = MoTForCausalLM.from_pretrained(tuned).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tuned)
    ids = tokenizer(["It was a dark and stormy night"], return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0].tolist()
    script = textwrap.dedent(f"""
        import json, sys
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(served)!r})
        model = AutoModelForCausalLM.from_pretrained({str(served)!r}).eval()
        ids = tokenizer(["It was a dark and stormy night"], return_tensors="pt").input_ids
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0].tolist()
        assert "mixture_of_tokens" not in sys.modules
        print(json.dumps(tokens))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ours
