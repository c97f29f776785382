"""`mot convert LLAMA_DIR OUT --to dense|mot|token_choice`: a saved `LlamaForCausalLM` as a MoT-family model.

The modern block options of `MoTConfig` (rotary positions, RMSNorm, gated feed-forward, grouped-query attention,
biases) are set from the Llama config and every tensor is copied:

- `--to dense` gives a model whose logits equal the Llama model's (the proof that the modern block *is* a Llama
  block; tests/test_llama_conversion.py checks it against transformers' own `LlamaForCausalLM`);
- `--to mot` / `--to token_choice` keep attention, norms and embeddings and the Llama feed-forward in the dense
  blocks, and initialise each routed block's experts from that block's feed-forward (sparse upcycling): with
  `--expert_size` equal to the Llama `intermediate_size` every expert is a copy of it; with a divisor of it, expert
  `e` takes slice `e mod (intermediate_size / expert_size)` of its hidden units. The router starts fresh.

Only what a Llama block computes is accepted; anything else (a sliding window, an unknown rope type, ...) is refused
with one line naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..folders.model_folder import CONFIG_FILE
from ..utils import UserError

TARGETS = ("dense", "mot", "token_choice")
# Llama config fields we cannot honour, with the value that means "not used".
UNSUPPORTED = {"sliding_window": None, "attention_sink": None, "use_sliding_window": False, "layer_types": None}


def read_llama_config(src: Path) -> dict:
    path = src / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is missing or not valid JSON ({error})") from error
    if config.get("model_type") != "llama":
        raise UserError(f"{src} holds a model of type {config.get('model_type')!r}, not 'llama'")
    return config


def mot_config_from_llama(llama: dict, to: str, routed_layers: list[int] | None, group_size: int,
                          num_experts: int | None, expert_size: int | None):
    """The MoTConfig of the converted model (UserError naming the first Llama field we cannot honour)."""
    from transformers import AutoConfig

    from .. import MoTConfig

    if to not in TARGETS:
        raise UserError(f"--to {to!r} is not a Llama conversion target; allowed: {', '.join(TARGETS)}")
    for name, unused in UNSUPPORTED.items():
        if llama.get(name, unused) not in (unused, False, None) and not (name == "layer_types" and all(
                kind == "full_attention" for kind in llama[name])):
            raise UserError(f"the Llama config sets {name}={llama[name]!r}, which MoT models do not support")
    if float(llama.get("attention_dropout") or 0.0) != 0.0:
        raise UserError(f"the Llama config sets attention_dropout={llama['attention_dropout']!r}; MoT models have "
                        "no attention dropout")
    hidden, heads = llama["hidden_size"], llama["num_attention_heads"]
    if llama.get("head_dim") not in (None, hidden // heads):
        raise UserError(f"the Llama config sets head_dim={llama['head_dim']!r}; MoT models use hidden_size / "
                        f"num_attention_heads = {hidden // heads}")
    # transformers itself turns rope_theta / rope_scaling into rope_parameters and checks the rope type.
    try:
        rope = AutoConfig.for_model("llama", **{k: v for k, v in llama.items() if k != "model_type"}).rope_parameters
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"the Llama config's RoPE settings are not ones transformers knows: {error}") from error
    layers = llama["num_hidden_layers"]
    d_ff = llama["intermediate_size"]
    if to == "dense":
        mlp_types = ["dense"] * layers
    else:
        routed = routed_layers if routed_layers is not None else list(range(layers // 2, layers))
        bad = [index for index in routed if not 0 <= index < layers]
        if bad:
            raise UserError(f"--routed_layers {bad[0]} is not a block of this {layers}-block model (0..{layers - 1})")
        mlp_types = [to if index in routed else "dense" for index in range(layers)]
    expert_size = expert_size or d_ff
    if d_ff % expert_size:
        raise UserError(f"--expert_size {expert_size} must divide the Llama intermediate_size {d_ff}: each expert "
                        "starts as a slice of the feed-forward layer")
    num_experts = num_experts or group_size
    try:
        return MoTConfig(
            vocab_size=llama["vocab_size"], hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=llama.get("num_key_value_heads") or heads, intermediate_size=d_ff,
            max_position_embeddings=llama.get("max_position_embeddings", 2048), position_embedding_type="rope",
            rope_parameters=rope, norm_type="rmsnorm", rms_norm_eps=llama.get("rms_norm_eps", 1e-6),
            gated_mlp=True, hidden_act=llama.get("hidden_act", "silu"),
            attention_bias=bool(llama.get("attention_bias", False)), mlp_bias=bool(llama.get("mlp_bias", False)),
            tie_word_embeddings=bool(llama.get("tie_word_embeddings", False)), mlp_types=mlp_types,
            group_size=group_size, num_experts=num_experts, expert_size=expert_size,
            bos_token_id=llama.get("bos_token_id"), eos_token_id=llama.get("eos_token_id"),
            pad_token_id=llama.get("pad_token_id"),
        )
    except ValueError as error:
        raise UserError(f"the converted configuration is invalid: {error}") from error


def read_llama_weights(src: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise UserError(f"{src} has no .safetensors weights (only safetensors are read)")
    weights = {}
    for path in files:
        try:
            weights.update(load_file(path))
        except Exception as error:  # safetensors raises its own error types for truncated or corrupted files
            raise UserError(f"{path} is not a readable safetensors file ({error})") from error
    return weights


def mot_state_from_llama(weights: dict, config) -> dict:
    """Our state dict for the Llama tensors: the same names for everything but the routed blocks' experts, which
    start from the block's FFN."""
    import torch

    def take(name):
        if name not in weights:
            raise UserError(f"the Llama weights lack {name}")
        return weights[name]

    routed = [f"model.layers.{index}.mlp." for index, kind in enumerate(config.mlp_types) if kind != "dense"]
    state = {name: tensor for name, tensor in weights.items()
             if not name.startswith(tuple(routed)) and not name.endswith(".rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    slices = config.intermediate_size // config.expert_size
    size, width = config.hidden_size, config.expert_size
    chosen = [expert % slices for expert in range(config.num_experts)]
    for prefix in routed:
        # Expert e = slice e mod k of the hidden units: [f_total, d] -> [k, f, d] -> E of them, [E, f, d]; our
        # experts are stored [E, in, out].
        gate = take(f"{prefix}gate_proj.weight").view(slices, width, size)[chosen]
        up = take(f"{prefix}up_proj.weight").view(slices, width, size)[chosen]
        down = take(f"{prefix}down_proj.weight").view(size, slices, width).permute(1, 2, 0)[chosen]  # [E, f, d]
        state[f"{prefix}experts.gate_up_proj"] = torch.cat([gate, up], dim=1).transpose(1, 2).contiguous()  # [E, d, 2f]
        state[f"{prefix}experts.down_proj"] = down.contiguous()
        if config.mlp_bias:
            gate_bias = take(f"{prefix}gate_proj.bias").view(slices, width)[chosen]
            up_bias = take(f"{prefix}up_proj.bias").view(slices, width)[chosen]
            state[f"{prefix}experts.gate_up_proj_bias"] = torch.cat([gate_bias, up_bias], dim=1)
            # The down projection's bias is added once per token in Llama; each expert output carries it once.
            state[f"{prefix}experts.down_proj_bias"] = take(f"{prefix}down_proj.bias").expand(config.num_experts,
                                                                                             size) / slices
    return state


def convert_llama(src: str | Path, dst: str | Path, to: str, routed_layers: list[int] | None = None,
                  group_size: int = 8, num_experts: int | None = None, expert_size: int | None = None,
                  overwrite: bool = False) -> Path:
    """Write the converted model folder (weights, config, code files, tokenizer, conversion.json, card)."""
    import torch

    from .. import MoTForCausalLM
    from ..folders.cards import refresh_card
    from ..folders.model_folder import CONVERSION_FILE, copy_tokenizer
    from ..utils import atomic_directory

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UserError(f"source model folder {str(src)!r} does not exist")
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} already exists; pass --overwrite to replace it")
    llama = read_llama_config(src)
    config = mot_config_from_llama(llama, to, routed_layers, group_size, num_experts, expert_size)
    state = mot_state_from_llama(read_llama_weights(src), config)
    torch.manual_seed(0)  # the fresh routers
    model = MoTForCausalLM(config)
    dtype = state["model.embed_tokens.weight"].dtype
    missing, unexpected = model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=False)
    fresh = [name for name in missing if name.endswith(".mlp.gate.weight")]
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()  # the embedding, tied by post_init
    if set(missing) - set(fresh) - tied or unexpected:
        raise UserError(f"internal mapping error: missing {sorted(set(missing) - set(fresh) - tied)}, unexpected "
                        f"{sorted(unexpected)}")
    model.to(dtype)
    with atomic_directory(dst, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        copy_tokenizer(src, staging)
        lineage = {"base_model": str(src), "base_model_path": str(src.resolve()), "base_model_type": "llama",
                   "method": f"llama_to_{to}", "mlp_types": list(config.mlp_types),
                   "experts_from": "each routed block's Llama feed-forward" if to != "dense" else None,
                   "fresh_tensors": fresh}
        (staging / CONVERSION_FILE).write_text(json.dumps(lineage, indent=2) + "\n")
    refresh_card(dst)  # reads conversion.json: the card names the Llama source
    return dst


__all__ = ["convert_llama", "mot_config_from_llama", "mot_state_from_llama", "TARGETS"]
