"""`export_gguf`: a Token Choice model as a GGUF of llama.cpp's qwen2moe. Everywhere: the file reads back with the
expected metadata, tensors and tokenizer; a dense block written as identical experts computes the dense block; what
cannot be exported is refused in one line with nothing written. Where llama-cpp-python is installed (not in CI;
marker `llama_cpp`): llama.cpp tokenizes, decodes greedily and scores like transformers."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch

from mixture_of_tokens import MoTConfig, MoTForCausalLM
from mixture_of_tokens.conversion.gguf_export import dense_as_experts, export_gguf
from mixture_of_tokens.utils import UserError

MODERN = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=24, expert_size=24,
              num_experts=4, group_size=2, max_position_embeddings=64, position_embedding_type="rope",
              norm_type="rmsnorm", gated_mlp=True, hidden_act="silu", num_hidden_layers=4, bos_token_id=0,
              eos_token_id=0, pad_token_id=0)
MIXED = ["dense", "token_choice", "dense", "token_choice"]
# Whitespace runs, digits, contractions, punctuation runs and multi-byte characters: where pre-tokenizers differ.
TRICKY = ["  two  spaces\tand a tab\n\n\nthree newlines   ",
          "I'm can't we'll they're you've I'd 12345 3.14",
          "naïve café — “quotes” ... !!!??", "日本語 and emoji 🙂👍", "trailing spaces   ", "<|endoftext|>after"]


@pytest.fixture
def save_model(tiny_model_folder):
    """`save_model(folder, tokenizer, vocab_size=None, **overrides)`: a random modern Token Choice model (fixed seed)
    and `tokenizer` copied to `folder` (a test may change its copy); returns the model."""

    def save(folder, tokenizer, vocab_size=None, **overrides):
        fields = {**MODERN, "vocab_size": vocab_size or len(tokenizer), "mlp_types": MIXED, **overrides}
        shutil.copytree(tiny_model_folder("src", preset=None, tokenizer=tokenizer, **fields), folder)
        return MoTForCausalLM.from_pretrained(folder).eval()

    return save


def read_gguf(path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    # GGUF lists dimensions innermost first; reversed, they are the numpy (torch) shape.
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    return fields, tensors


def values(tensor) -> np.ndarray:
    return np.asarray(tensor.data, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))


@pytest.mark.parametrize(("top_k", "tied"), [(1, False), (2, True)])
def test_the_gguf_reads_back_as_qwen2moe(tmp_path, save_model, small_tokenizer, top_k, tied):
    vocab_size = len(small_tokenizer) + 4  # an embedding padded past the tokenizer's ids
    model = save_model(tmp_path / "src", small_tokenizer, vocab_size=vocab_size, num_experts_per_tok=top_k,
                       tie_word_embeddings=tied)
    out = export_gguf(tmp_path / "src", tmp_path / "model.gguf")
    assert out == tmp_path / "model.gguf" and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "src"]
    fields, tensors = read_gguf(out)
    arch = "qwen2moe"
    assert fields["general.architecture"] == arch
    expected = {"block_count": 4, "context_length": 64, "embedding_length": 32, "feed_forward_length": 24,
                "attention.head_count": 4, "attention.head_count_kv": 2, "rope.freq_base": 10000.0,
                "expert_count": 4, "expert_used_count": top_k, "expert_feed_forward_length": 24,
                "expert_shared_feed_forward_length": 1, "rope.dimension_count": 8}
    assert {key: fields[f"{arch}.{key}"] for key in expected} == expected
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)

    # The tokenizer: byte-level BPE under llama.cpp's names, padded ids unused, no BOS added to a text.
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    vocab = small_tokenizer.get_vocab()
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == vocab_size and all(tokens[index] == token for token, index in vocab.items())
    types = fields["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.CONTROL and set(types[1:len(vocab)]) == {gguf.TokenType.NORMAL}
    assert set(types[len(vocab):]) == {gguf.TokenType.UNUSED}
    merges = json.loads(small_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (0, 0)
    assert bool(fields["tokenizer.ggml.add_bos_token"]) is False

    # The tensors: llama.cpp's names and shapes ({in, out} of our [out, in]), every block as experts.
    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    per_block = {"attn_norm.weight": [32], "attn_q.weight": [32, 32], "attn_q.bias": [32], "attn_k.weight": [32, 16],
                 "attn_k.bias": [16], "attn_v.weight": [32, 16], "attn_v.bias": [16], "attn_output.weight": [32, 32],
                 "ffn_norm.weight": [32], "ffn_gate_inp.weight": [32, 4], "ffn_gate_exps.weight": [32, 24, 4],
                 "ffn_up_exps.weight": [32, 24, 4], "ffn_down_exps.weight": [24, 32, 4],
                 "ffn_gate_inp_shexp.weight": [32], "ffn_gate_shexp.weight": [32, 1], "ffn_up_shexp.weight": [32, 1],
                 "ffn_down_shexp.weight": [1, 32]}
    shapes = {"token_embd.weight": [32, vocab_size], "output_norm.weight": [32], "output.weight": [32, vocab_size]}
    shapes |= {f"blk.{index}.{name}": shape for index in range(4) for name, shape in per_block.items()}
    assert {name: tensor.shape.tolist() for name, tensor in tensors.items()} == shapes
    assert {tensor.tensor_type for tensor in tensors.values()} == {gguf.GGMLQuantizationType.F32}
    embedding = state["model.embed_tokens.weight"]
    np.testing.assert_array_equal(values(tensors["token_embd.weight"]), embedding)
    np.testing.assert_array_equal(values(tensors["output.weight"]), embedding if tied else state["lm_head.weight"])
    for index, kind in enumerate(MIXED):
        ours, theirs = f"model.layers.{index}.", f"blk.{index}."
        np.testing.assert_array_equal(values(tensors[theirs + "attn_k.weight"]),
                                      state[ours + "self_attn.k_proj.weight"])
        assert not values(tensors[theirs + "attn_q.bias"]).any()
        gate, up, down = (values(tensors[f"{theirs}ffn_{name}_exps.weight"]) for name in ("gate", "up", "down"))
        router = values(tensors[theirs + "ffn_gate_inp.weight"])
        if kind == "dense":  # E copies of the dense layer behind a zero router, down scaled by E/k
            assert not router.any()
            for expert in range(4):
                np.testing.assert_array_equal(gate[expert], state[ours + "mlp.gate_proj.weight"])
                np.testing.assert_array_equal(up[expert], state[ours + "mlp.up_proj.weight"])
                np.testing.assert_allclose(down[expert], state[ours + "mlp.down_proj.weight"] * 4 / top_k, rtol=1e-6)
        else:
            np.testing.assert_array_equal(router, state[ours + "mlp.gate.weight"])
            gate_up = state[ours + "mlp.experts.gate_up_proj"].transpose(0, 2, 1)  # ours [E, d, 2f] -> [E, 2f, d]
            np.testing.assert_array_equal(gate, gate_up[:, :24])
            np.testing.assert_array_equal(up, gate_up[:, 24:])
            np.testing.assert_array_equal(down, state[ours + "mlp.experts.down_proj"].transpose(0, 2, 1))
        # The silent shared expert: zero weights behind a non-zero gate (a zero gate makes llama.cpp's NaN).
        assert (values(tensors[theirs + "ffn_gate_inp_shexp.weight"]) == 1).all()
        for name in ("gate", "up", "down"):
            assert not values(tensors[f"{theirs}ffn_{name}_shexp.weight"]).any()


def test_f16_keeps_vectors_and_routers_in_f32(tmp_path, save_model, small_tokenizer):
    save_model(tmp_path / "src", small_tokenizer)
    _, tensors = read_gguf(export_gguf(tmp_path / "src", tmp_path / "model.gguf", dtype="f16"))
    f32 = {name for name, tensor in tensors.items() if tensor.tensor_type == gguf.GGMLQuantizationType.F32}
    assert f32 == {name for name, tensor in tensors.items()
                   if len(tensor.shape) == 1 or name.endswith("ffn_gate_inp.weight")}
    assert tensors["blk.1.ffn_gate_exps.weight"].tensor_type == gguf.GGMLQuantizationType.F16


def test_mot_convert_to_gguf_writes_the_file(tmp_path, save_model, small_tokenizer):
    from mixture_of_tokens.cli import main as mot

    save_model(tmp_path / "src", small_tokenizer)
    out = tmp_path / "served.gguf"
    assert mot(["convert", str(tmp_path / "src"), str(out), "--to", "gguf", "--gguf_dtype", "f16"]) == 0
    fields, tensors = read_gguf(out)
    assert fields["general.architecture"] == "qwen2moe"
    assert tensors["blk.1.ffn_up_exps.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert mot(["convert", str(tmp_path / "src"), str(out), "--to", "gguf"]) == 2  # exists: --overwrite


@pytest.mark.parametrize(("num_experts", "top_k"), [(4, 1), (4, 2), (3, 2), (5, 5)])
def test_a_dense_block_as_identical_experts_computes_the_dense_block(num_experts, top_k):
    """What the GGUF does to a dense block, in our own model: the same block as Token Choice, its experts copies of
    the dense layer behind a zero router with down projections scaled by E/k, gives the dense block's output."""
    fields = {**MODERN, "vocab_size": 50, "num_experts": num_experts, "num_experts_per_tok": top_k}
    torch.manual_seed(0)
    dense = MoTForCausalLM(MoTConfig(**fields, mlp_types=MIXED)).eval()
    routed = MoTForCausalLM(MoTConfig(**fields, mlp_types=["token_choice"] * 4)).eval()
    state = dense.state_dict()
    for index, kind in enumerate(MIXED):
        if kind == "dense":
            prefix = f"model.layers.{index}.mlp."
            router, gate_up, down = dense_as_experts(*(state.pop(f"{prefix}{name}_proj.weight")
                                                       for name in ("gate", "up", "down")), num_experts, top_k)
            state |= {prefix + "gate.weight": router, prefix + "experts.gate_up_proj": gate_up,
                      prefix + "experts.down_proj": down}
    routed.load_state_dict(state)
    hidden = torch.randn(2, 7, MODERN["hidden_size"])
    with torch.no_grad():
        for index in (0, 2):
            theirs = routed.model.layers[index].mlp(hidden)
            ours = dense.model.layers[index].mlp(hidden)
            torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
        ids = torch.randint(0, 50, (2, 9))
        torch.testing.assert_close(routed(ids).logits, dense(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("overrides", "words"), [
    (dict(intermediate_size=40), "intermediate_size (40) equal to expert_size (24)"),
    (dict(mlp_types=["dense", "dense", "mot", "token_choice"]), "mot transition"),
    (dict(mlp_types=["dense"] * 4), "a dense model has no experts"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}), "rope_type 'linear'"),
])
def test_what_cannot_be_exported_is_refused_in_one_line(tmp_path, save_model, small_tokenizer, overrides, words):
    save_model(tmp_path / "src", small_tokenizer, **overrides)
    with pytest.raises(UserError) as refusal:
        export_gguf(tmp_path / "src", tmp_path / "model.gguf")
    message = str(refusal.value)
    assert len(message.splitlines()) == 1 and words in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_an_existing_output_is_kept_without_overwrite(tmp_path, save_model, small_tokenizer):
    save_model(tmp_path / "src", small_tokenizer)
    (tmp_path / "model.gguf").write_text("keep me")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        export_gguf(tmp_path / "src", tmp_path / "model.gguf")
    assert (tmp_path / "model.gguf").read_text() == "keep me"
    export_gguf(tmp_path / "src", tmp_path / "model.gguf", overwrite=True)
    assert read_gguf(tmp_path / "model.gguf")[0]["general.architecture"] == "qwen2moe"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "src"]


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(tmp_path, save_model, small_tokenizer):
    from tokenizers import pre_tokenizers

    save_model(tmp_path / "src", None, vocab_size=len(small_tokenizer))
    with pytest.raises(UserError, match="has no tokenizer.json"):
        export_gguf(tmp_path / "src", tmp_path / "model.gguf")
    small_tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    try:
        small_tokenizer.save_pretrained(tmp_path / "src")
    finally:
        small_tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    with pytest.raises(UserError, match="llama.cpp would tokenize differently") as refusal:
        export_gguf(tmp_path / "src", tmp_path / "model.gguf")
    assert len(str(refusal.value).splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --------------------------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python; not installed in CI)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.mark.llama_cpp
@pytest.mark.parametrize(("top_k", "tied"), [(1, False), (2, True)])
def test_llama_cpp_runs_the_gguf_like_transformers(llama_cpp, tmp_path, save_model, novels_text, tiny_tokenizer, top_k,
                                                   tied):
    """llama.cpp tokenizes a text as we do, decodes greedily to the same tokens and scores within float error.

    init_scale 4: a random model with the default scale repeats one or a few tokens; this one's greedy continuation
    has dozens of distinct tokens, with top-1/top-2 logit gaps far above float error. The KV cache is fp32: with
    llama.cpp's default fp16 cache the logits differ by about 3e-4 (fp16 rounding of keys and values), with fp32
    by about 1e-6, which is what shows the export computes our model exactly."""
    model = save_model(tmp_path / "src", tiny_tokenizer, hidden_size=64, intermediate_size=48, expert_size=48,
                       max_position_embeddings=256, num_experts_per_tok=top_k, tie_word_embeddings=tied,
                       init_scale=4.0)
    path = export_gguf(tmp_path / "src", tmp_path / "model.gguf")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)

    # Tokenization: a stretch of the novels, and strings where pre-tokenizers tend to differ.
    for text in [novels_text[:50_000], *TRICKY]:
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert theirs == tiny_tokenizer(text, add_special_tokens=False)["input_ids"], text[:80]

    # Greedy decoding, token by token through llama.cpp's cache.
    prompt = tiny_tokenizer(novels_text[:200], add_special_tokens=False)["input_ids"][:24]
    new_tokens = 48
    with torch.no_grad():
        ours = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              eos_token_id=None)[0, len(prompt):].tolist()
    assert len(set(ours)) > 10  # a continuation worth comparing
    llm.reset()
    llm.eval(prompt)
    theirs = []
    for _ in range(new_tokens):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    assert theirs == ours

    # Logits of every position of the whole sequence in one pass.
    sequence = prompt + ours
    llm.reset()
    llm.eval(sequence)
    theirs = np.asarray(llm.scores[: len(sequence)], dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.tensor([sequence])).logits[0].numpy()
    difference = float(np.abs(theirs - expected).max())
    print(f"top_k={top_k} tied={tied}: largest logit difference {difference:.3g} (logits up to "
          f"{np.abs(expected).max():.3g})")
    assert difference < 1e-4
