"""`export_gguf`: a Token Choice model as one GGUF file that llama.cpp runs, under its `qwen2moe` architecture.

The model is the one `export.py` writes as a transformers `Qwen2MoeForCausalLM`; here the same tensors go into
llama.cpp's file format, under llama.cpp's names. Two things differ from the transformers export:

- llama.cpp's qwen2moe has no `mlp_only_layers`: every block is a mixture of experts. A dense block is written as `E`
  identical experts, each a copy of the dense feed-forward layer, behind a zero router: the router's probabilities
  are all `1/E`, the top-k picks any `k` of the copies, and their down projections are scaled by `E/k`, so the `k`
  gated outputs add up to the dense layer's output. Every expert then has the dense layer's width, which is why a
  dense block needs `intermediate_size == expert_size`.
- llama.cpp's qwen2moe requires the output matrix, so a model with tied embeddings gets a copy of them as `output`.

The shared expert that Qwen2-MoE has and we do not is silenced as in `export.py`: width 1, zero weights, and a
gate of ones (llama.cpp computes its sigmoid as `silu(x) / x`, so a zero gate gives 0/0 = NaN logits). Zero
query/key/value biases are written too: recent llama.cpp treats them as optional, earlier releases require them.

The tokenizer travels in the file as llama.cpp's "gpt2" tokenizer model (byte-level BPE: tokens, token types,
merges) with the pre-tokenizer "gpt-2" (GPT-2's split of text into words before the merges), which is what
`tokenization.train_bpe_tokenizer` trains; a tokenizer that llama.cpp would split differently is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..utils import UserError, atomic_write
from .export import export_refusal, exportable_config

GGUF_ARCH = "qwen2moe"
GGUF_DTYPES = ("f32", "f16")
# llama.cpp's name for GPT-2's regex pre-tokenizer (src/llama-vocab.cpp); "gpt2" there is the tokenizer *model*
# (byte-level BPE), and as a pre-tokenizer name it is refused ("unknown pre-tokenizer type").
GGUF_TOKENIZER_MODEL = "gpt2"
GGUF_TOKENIZER_PRE = "gpt-2"


def gguf_refusal(config) -> str | None:
    """Why `config` cannot become a qwen2moe GGUF (one line), or None."""
    refusal = export_refusal(config, "qwen2_moe")
    if refusal:
        return refusal
    if config.hidden_act not in ("silu", "swish"):
        return f"hidden_act {config.hidden_act!r}: llama.cpp's qwen2moe experts are SwiGLU (silu)"
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type != "default":
        return f"rope_type {rope_type!r}: only the original RoPE (rope_type default) is written to GGUF"
    if "dense" in config.mlp_types and config.intermediate_size != config.expert_size:
        return (f"llama.cpp's qwen2moe runs every block as experts, and a dense block becomes {config.num_experts} "
                f"copies of its feed-forward layer, which needs intermediate_size ({config.intermediate_size}) equal "
                f"to expert_size ({config.expert_size})")
    return None


def dense_as_experts(gate_proj, up_proj, down_proj, num_experts: int, top_k: int):
    """A dense SwiGLU layer (`gate_proj`, `up_proj [f, d]`, `down_proj [d, f]`) as a Token Choice layer computing
    exactly it, in our experts' layout: router `[E, d]` of zeros, `gate_up_proj [E, d, 2f]` (gate columns first) and
    `down_proj [E, f, d]`, every expert a copy, the down projections scaled by `E/k`. With a zero router every
    probability is `1/E`; the top-k takes `k` of the copies and `k * (1/E) * (E/k) = 1`."""
    import torch

    router = torch.zeros(num_experts, gate_proj.shape[1], dtype=gate_proj.dtype)
    gate_up = torch.cat([gate_proj, up_proj], dim=0).T.expand(num_experts, -1, -1)  # [2f, d] -> [E, d, 2f]
    down = (down_proj * (num_experts / top_k)).T.expand(num_experts, -1, -1)  # [d, f] -> [E, f, d]
    return router, gate_up.contiguous(), down.contiguous()


def gguf_tensors(state_dict: dict, config) -> dict:
    """Our tensors (torch layout, `[out, in]`) under llama.cpp's qwen2moe names.

    GGUF lists dimensions innermost first, so a row-major `[out, in]` array is the `{in, out}` that llama.cpp asks
    for, and stacked experts `[E, f, d]` / `[E, d, f]` (ours transposed to that layout) are its `{d, f, E}` /
    `{f, d, E}`."""
    import torch

    size = config.hidden_size
    kv_size = config.num_key_value_heads * config.head_dim
    embedding = state_dict["model.embed_tokens.weight"]
    zeros = {"dtype": embedding.dtype}
    tensors = {"token_embd.weight": embedding, "output_norm.weight": state_dict["model.norm.weight"],
               # llama.cpp's qwen2moe requires `output`; tied embeddings are written twice.
               "output.weight": embedding if config.tie_word_embeddings else state_dict["lm_head.weight"]}
    for index, kind in enumerate(config.mlp_types):
        ours, theirs = f"model.layers.{index}.", f"blk.{index}."
        tensors[theirs + "attn_norm.weight"] = state_dict[ours + "input_layernorm.weight"]
        for name, target, width in (("q_proj", "attn_q", size), ("k_proj", "attn_k", kv_size),
                                    ("v_proj", "attn_v", kv_size)):
            tensors[f"{theirs}{target}.weight"] = state_dict[f"{ours}self_attn.{name}.weight"]
            tensors[f"{theirs}{target}.bias"] = torch.zeros(width, **zeros)
        tensors[theirs + "attn_output.weight"] = state_dict[ours + "self_attn.o_proj.weight"]
        tensors[theirs + "ffn_norm.weight"] = state_dict[ours + "post_attention_layernorm.weight"]
        if kind == "dense":
            router, gate_up, down = dense_as_experts(
                state_dict[ours + "mlp.gate_proj.weight"], state_dict[ours + "mlp.up_proj.weight"],
                state_dict[ours + "mlp.down_proj.weight"], config.num_experts, config.num_experts_per_tok)
        else:
            router = state_dict[ours + "mlp.gate.weight"]
            gate_up, down = state_dict[ours + "mlp.experts.gate_up_proj"], state_dict[ours + "mlp.experts.down_proj"]
        # Ours are [E, in, out]: [E, d, 2f] -> [E, 2f, d] -> two [E, f, d], gate rows first; [E, f, d] -> [E, d, f]
        gate, up = gate_up.transpose(1, 2).chunk(2, dim=1)
        down = down.transpose(1, 2)
        tensors[theirs + "ffn_gate_inp.weight"] = router  # [E, d]
        tensors[theirs + "ffn_gate_exps.weight"] = gate
        tensors[theirs + "ffn_up_exps.weight"] = up
        tensors[theirs + "ffn_down_exps.weight"] = down  # [E, d, f]
        # The silent shared expert of width 1: zero weights, a gate of ones (a zero gate makes llama.cpp's NaN).
        tensors[theirs + "ffn_gate_inp_shexp.weight"] = torch.ones(size, **zeros)  # {d}: one logit per token
        tensors[theirs + "ffn_gate_shexp.weight"] = torch.zeros(1, size, **zeros)
        tensors[theirs + "ffn_up_shexp.weight"] = torch.zeros(1, size, **zeros)
        tensors[theirs + "ffn_down_shexp.weight"] = torch.zeros(size, 1, **zeros)
    return tensors


def _stays_f32(name: str, array) -> bool:
    """What llama.cpp keeps in fp32 in an f16 file: vectors (norms, biases, the shared expert's gate) and the
    routers, whose softmax picks the experts."""
    return array.ndim <= 1 or name.endswith("ffn_gate_inp.weight")


def tokenizer_refusal(backend: dict) -> str | None:
    """Why llama.cpp's "gpt2" tokenizer with the "gpt-2" pre-tokenizer would not tokenize like `backend` (the
    tokenizer.json dict), or None."""
    model = backend.get("model") or {}
    if model.get("type") != "BPE":
        return f"its tokenizer is {model.get('type')!r}, not byte-level BPE"
    if backend.get("normalizer") is not None:
        return f"its tokenizer normalises text ({backend['normalizer'].get('type')}), which llama.cpp's gpt2 does not"
    pre = backend.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return (f"its pre-tokenizer ({json.dumps(pre)}) is not GPT-2's byte-level split (ByteLevel, "
                "add_prefix_space=false, use_regex=true)")
    for option in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option):
            return f"its BPE sets {option}={model[option]!r}, which llama.cpp's gpt2 does not"
    if model.get("byte_fallback") or model.get("ignore_merges"):
        return "its BPE uses byte_fallback or ignore_merges, which llama.cpp's gpt2 does not"
    return None


def gguf_vocab(tokenizer, vocab_size: int) -> dict:
    """The tokenizer as llama.cpp's GGUF keys: token strings (byte-level: GPT-2's printable stand-ins for bytes),
    token types, merges "a b" in rank order, and whether BOS / EOS are added to a text. Ids past the tokenizer's
    (an embedding padded to a round size) become unused placeholder tokens."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()  # the BPE vocabulary and the added tokens
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} "
                        "embeddings")
    added = tokenizer.added_tokens_decoder
    tokens = [f"[PAD{index}]" for index in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in vocab.items():
        tokens[index] = token
        if index not in added:
            types[index] = gguf.TokenType.NORMAL
        else:  # matched whole in the text before BPE; special ones (<|endoftext|>) only when asked for
            types[index] = gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED
    # tokenizers writes merges as pairs (0.20 and later) or as "a b" strings; llama.cpp reads "a b".
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in backend["model"]["merges"]]
    # Whether a tokenizer adds BOS / EOS lives in its post-processor; what it does to a text says it plainly.
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a")["input_ids"]
    add_bos = len(special) > len(plain) and special[0] == tokenizer.bos_token_id
    add_eos = len(special) > len(plain) and special[-1] == tokenizer.eos_token_id
    return {"tokens": tokens, "types": types, "merges": merges, "add_bos": add_bos, "add_eos": add_eos}


def _first(token_id):
    """A config's token id, or the first of a list of ids (llama.cpp takes one)."""
    return token_id[0] if isinstance(token_id, (list, tuple)) and token_id else token_id


def write_gguf(path: Path, config, tensors: dict, vocab: dict, name: str, dtype: str = "f32") -> None:
    """Write `tensors` (llama.cpp names, torch layout) and the metadata of a qwen2moe model to `path`."""
    import gguf
    import numpy as np
    import torch

    writer = gguf.GGUFWriter(path, GGUF_ARCH)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.expert_size)
    writer.add_expert_shared_feed_forward_length(1)
    writer.add_tokenizer_model(GGUF_TOKENIZER_MODEL)
    writer.add_tokenizer_pre(GGUF_TOKENIZER_PRE)
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for token_id, add in ((config.bos_token_id, writer.add_bos_token_id),
                          (config.eos_token_id, writer.add_eos_token_id),
                          (config.pad_token_id, writer.add_pad_token_id)):
        if _first(token_id) is not None:
            add(_first(token_id))
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    for tensor_name, tensor in tensors.items():
        array = tensor.detach().to(torch.float32).contiguous().numpy()
        if dtype == "f16" and not _stays_f32(tensor_name, array):
            array = array.astype(np.float16)
        writer.add_tensor(tensor_name, array)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def export_gguf(src: str | Path, out_file: str | Path, overwrite: bool = False, dtype: str = "f32") -> Path:
    """Write `out_file`: the MoT-family model folder `src` (a Token Choice model with the modern block, and its
    byte-level BPE tokenizer) as a GGUF of llama.cpp's qwen2moe (see the module docstring), in one rename."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in GGUF_DTYPES:
        raise UserError(f"GGUF tensor type {dtype!r} is not supported; allowed: {', '.join(GGUF_DTYPES)}")
    try:
        import gguf  # noqa: F401  (an optional dependency: say how to get it before any work is done)
    except ImportError:
        raise UserError("writing GGUF needs the gguf package: pip install 'mixture-of-tokens[gguf]'") from None
    src, out_file = Path(src), Path(out_file)
    if out_file.is_dir():
        raise UserError(f"{out_file} is a folder; give the path of the .gguf file to write")
    if out_file.exists() and not overwrite:
        raise UserError(f"{out_file} already exists; pass --overwrite to replace it")
    config = exportable_config(src, f"GGUF ({GGUF_ARCH})", gguf_refusal)
    if not (src / "tokenizer.json").is_file():
        raise UserError(f"{str(src)!r} has no tokenizer.json; a GGUF carries its tokenizer, save it into the folder")
    tokenizer = AutoTokenizer.from_pretrained(src)
    refusal = tokenizer_refusal(json.loads(tokenizer.backend_tokenizer.to_str()))
    if refusal:
        raise UserError(f"{str(src)!r} cannot be exported to GGUF: llama.cpp would tokenize differently: {refusal}")
    vocab = gguf_vocab(tokenizer, config.vocab_size)

    model = AutoModelForCausalLM.from_pretrained(src)  # converts checkpoints with the earlier names
    tensors = gguf_tensors(model.state_dict(), config)
    return atomic_write(out_file, lambda path: write_gguf(path, config, tensors, vocab, name=src.resolve().name,
                                                          dtype=dtype))


__all__ = ["export_gguf", "gguf_refusal", "gguf_tensors", "gguf_vocab", "dense_as_experts", "tokenizer_refusal",
           "GGUF_ARCH", "GGUF_DTYPES"]
