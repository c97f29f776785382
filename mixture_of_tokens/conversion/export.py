"""`mot convert SRC OUT --to qwen2_moe | llama`: a model folder of a stock transformers architecture.

A Token Choice model with the modern (Llama-style) block is exactly a `Qwen2MoeForCausalLM`: its router (softmax over
experts in fp32, top-k, gates not renormalised) is Qwen2-MoE's with `norm_topk_prob=False`, its dense blocks are
Qwen2-MoE's `mlp_only_layers`, and attention, RMSNorm, rotary embeddings and grouped-query attention are the same
computation under the same names (the stacked experts transposed to its layout). What Qwen2-MoE has and we do not
is written so that it changes nothing: zero query/key/value biases, and a shared expert of width 1 whose weights are
zero (its gate stays non-zero: a zero gate makes llama.cpp's Qwen2-MoE return NaN). A dense modern model is a
`LlamaForCausalLM` (`--to llama`).

The output folder is plain transformers: `config.json` without `auto_map`, no code files, safetensors written by the
stock class's own `save_pretrained`, the tokenizer, `conversion.json` and a card. It loads with
`AutoModelForCausalLM.from_pretrained(OUT)` anywhere, without `trust_remote_code`, and serving engines that run the
stock architecture (vLLM, SGLang, TGI) run it. llama.cpp, whose qwen2moe makes every block a MoE block, takes the
GGUF that `gguf_export.py` writes (`--to gguf`).

What the stock architectures cannot compute is refused in one line, before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..utils import UserError

EXPORT_TARGETS = ("qwen2_moe", "llama")


def export_refusal(config, to: str) -> str | None:
    """Why `config` cannot become `to` (one line), or None."""
    paper = []
    if config.position_embedding_type != "rope":
        paper.append("learned absolute positions")
    if config.norm_type != "rmsnorm":
        paper.append("LayerNorm")
    if not config.gated_mlp:
        paper.append("non-gated feed-forward layers")
    if not config.final_norm:
        paper.append("no final norm")
    if paper:
        return (f"the paper's block ({', '.join(paper)}) has no stock {to} counterpart; only the modern block "
                "(position_embedding_type=rope, norm_type=rmsnorm, gated_mlp=true) exports")
    if config.attention_bias:
        return f"attention biases (attention_bias=true): {to}'s attention output projection has no bias"
    if config.mlp_bias:
        return f"feed-forward biases (mlp_bias=true): {to} has none"
    grouped = config.grouped_layer_types
    if grouped:
        return (f"{' and '.join(grouped)} layers (mlp_types {config.mlp_types}) have no stock counterpart: their "
                "groups mix sequences; `mot transition` them into Token Choice first, then export that model")
    if to == "llama" and "token_choice" in config.mlp_types:
        return "Token Choice layers need a mixture-of-experts architecture: use --to qwen2_moe"
    if to == "qwen2_moe" and "token_choice" not in config.mlp_types:
        return "a dense model has no experts for Qwen2-MoE: use --to llama"
    return None


def _common_fields(config) -> dict:
    return dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
                num_key_value_heads=config.num_key_value_heads, hidden_act=config.hidden_act,
                max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
                rope_parameters=dict(config.rope_parameters), tie_word_embeddings=config.tie_word_embeddings,
                intermediate_size=config.intermediate_size, bos_token_id=config.bos_token_id,
                eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, use_cache=True)


def stock_config(config, to: str):
    """The stock transformers config computing what `config` computes."""
    from transformers import LlamaConfig, Qwen2MoeConfig

    if to == "llama":
        return LlamaConfig(**_common_fields(config), attention_bias=False, mlp_bias=False)
    return Qwen2MoeConfig(
        **_common_fields(config),
        num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
        moe_intermediate_size=config.expert_size, norm_topk_prob=False, decoder_sparse_step=1,
        mlp_only_layers=[index for index, kind in enumerate(config.mlp_types) if kind == "dense"],
        shared_expert_intermediate_size=1, qkv_bias=True, use_sliding_window=False,
        router_aux_loss_coef=config.router_aux_loss_coef,
    )


def standard_expert_layout(state_dict: dict) -> dict:
    """Our stacked experts (`[E, in, out]`, transformers' transposed layout) in the layout of Qwen2-MoE and most of
    transformers' MoE models, `[E, out, in]`: `gate_up_proj [E, 2f, d]` (gate rows first), `down_proj [E, d, f]`."""
    return {name: tensor.transpose(1, 2).contiguous() if ".mlp.experts." in name and name.endswith("_proj") else tensor
            for name, tensor in state_dict.items()}


def stock_state_dict(state_dict: dict, config, to: str) -> dict:
    """Our tensors under the stock architecture's names (they are the same names; the experts transposed to its
    layout) plus, for Qwen2-MoE, what it has and we do not, set so that it changes nothing."""
    import torch

    state = {name: tensor for name, tensor in standard_expert_layout(state_dict).items()
             if not name.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if to == "llama":
        return state
    reference = state["model.embed_tokens.weight"]
    zeros = {"dtype": reference.dtype}
    size, kv_size = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    for index, kind in enumerate(config.mlp_types):
        prefix = f"model.layers.{index}."
        for name, width in (("q_proj", size), ("k_proj", kv_size), ("v_proj", kv_size)):
            state[f"{prefix}self_attn.{name}.bias"] = torch.zeros(width, **zeros)
        if kind == "dense":
            continue
        # A shared expert that adds exactly zero: zero weights, and a gate that is not zero.
        state[f"{prefix}mlp.shared_expert.gate_proj.weight"] = torch.zeros(1, config.hidden_size, **zeros)
        state[f"{prefix}mlp.shared_expert.up_proj.weight"] = torch.zeros(1, config.hidden_size, **zeros)
        state[f"{prefix}mlp.shared_expert.down_proj.weight"] = torch.zeros(config.hidden_size, 1, **zeros)
        state[f"{prefix}mlp.shared_expert_gate.weight"] = torch.ones(1, config.hidden_size, **zeros)
    return state


def exportable_config(src: Path, target: str, refusal) -> object:
    """The config of the MoT-family model folder `src`, or one `UserError` line: not a folder, not ours, broken
    weights, or `refusal(config)` (a reason, or None) says `target` cannot take it."""
    from transformers import AutoConfig

    from .. import MoTConfig
    from ..folders.model_folder import check_config, check_weights

    if not src.is_dir():
        raise UserError(f"source model folder {str(src)!r} does not exist")
    model_type = check_config(src).get("model_type")
    if model_type != MoTConfig.model_type:
        raise UserError(f"{str(src)!r} is a model of type {model_type!r}; only MoT-family models export to {target}")
    check_weights(src)
    config = AutoConfig.from_pretrained(src)
    reason = refusal(config)
    if reason:
        raise UserError(f"{str(src)!r} cannot be exported to {target}: {reason}")
    return config


def export_stock(src: str | Path, dst: str | Path, to: str, overwrite: bool = False) -> Path:
    """Write `dst`: the MoT-family model folder `src` as a stock `to` model folder (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    from .. import MoTConfig
    from ..folders.model_folder import CARD_FILE, CONVERSION_FILE, copy_tokenizer
    from ..utils import atomic_directory

    if to not in EXPORT_TARGETS:
        raise UserError(f"--to {to!r} is not an export target; allowed: {', '.join(EXPORT_TARGETS)}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} already exists; pass --overwrite to replace it")
    config = exportable_config(src, to, lambda config: export_refusal(config, to))

    source = AutoModelForCausalLM.from_pretrained(src)  # converts checkpoints with the earlier names
    target_config = stock_config(config, to)
    target = AutoModelForCausalLM.from_config(target_config)
    missing, unexpected = target.load_state_dict(stock_state_dict(source.state_dict(), config, to), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise UserError(f"internal mapping error: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    target.to(source.dtype)
    target.generation_config = source.generation_config
    with atomic_directory(dst, overwrite=overwrite) as staging:
        target.save_pretrained(staging)
        copy_tokenizer(src, staging)
        lineage = {"base_model": str(src), "base_model_path": str(src.resolve()), "base_model_type": MoTConfig.model_type,
                   "method": f"export_to_{to}", "mlp_types": list(config.mlp_types),
                   "architecture": type(target).__name__, "source_config": config.to_dict()}
        (staging / CONVERSION_FILE).write_text(json.dumps(lineage, indent=2, default=str) + "\n")
        (staging / CARD_FILE).write_text(export_card(src, dst, config, type(target).__name__))
    return dst


def export_card(src: Path, dst: Path, config, architecture: str) -> str:
    """The exported folder's README.md: what it was converted from, with the source's recipe, and how to serve it."""
    from ..folders.cards import training_section

    recipe = training_section(src, config.max_position_embeddings)
    rows = "\n".join(f"| {key} | {value} |" for key, value in (recipe or {}).get("rows", []))
    recipe_text = (f"| setting | value |\n|---|---|\n{rows}\n" if rows
                   else "The source folder records no training arguments.\n")
    layers = ", ".join(f"{index}: {kind}" for index, kind in enumerate(config.mlp_types))
    model_type = "qwen2_moe" if architecture.startswith("Qwen2Moe") else "llama"
    return f"""---
library_name: transformers
tags:
- mixture-of-tokens
- {model_type}
---

# {dst.name}

A model trained with the mixture-of-tokens package (Mixture of Tokens, Antoniak et al., arXiv 2310.15961), exported to transformers' stock `{architecture}`: it loads without
`trust_remote_code` and runs wherever `{model_type}` runs. The export is exact: the same computation under the same
names{", plus zero query/key/value biases and a zero-weight shared expert of width 1" if model_type == "qwen2_moe" else ""}.

## Converted from

`{src.name}` (model_type `mot`, blocks: {layers}; hidden size {config.hidden_size}, {config.num_experts} experts of
width {config.expert_size}, top-{config.num_experts_per_tok} routing, not renormalised). `conversion.json` holds the
source's full config.

## Training recipe of the source

{recipe_text}
## Serving

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{dst.name}")
tokenizer = AutoTokenizer.from_pretrained("{dst.name}")
```

- vLLM: `vllm serve {dst.name}` (its `{architecture}` honours `mlp_only_layers` and `norm_topk_prob`).
- transformers: `transformers serve` with continuous batching.
"""


__all__ = ["export_stock", "export_refusal", "stock_config", "stock_state_dict", "EXPORT_TARGETS"]
