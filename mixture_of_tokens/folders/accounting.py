"""Parameters and FLOPs of a `MoTConfig`, from the config alone (no model is built): what the model card reports.

Counts match the built model (tests/test_hub.py compares them for every layer type and block option).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelSize:
    total_params: int
    active_params: int
    flops_per_token: int  # forward, 2 x multiply-adds, at full context
    attention_flops_per_token: int  # the part of flops_per_token spent on attention scores


def _matrices(config) -> int:
    """Weight matrices of one feed-forward (or expert): up and down, plus the gate of a gated layer."""
    return 3 if config.gated_mlp else 2


def _ffn_one(config, width: int) -> int:
    """Parameters of one feed-forward layer (or one expert) of hidden width `width`, biases included."""
    d = config.hidden_size
    biases = (_matrices(config) - 1) * width + d if config.mlp_bias else 0
    return _matrices(config) * d * width + biases


def _ffn_params(config, mlp_type: str) -> tuple[int, int]:
    """(all parameters, parameters a token's compute pays for) of one feed-forward layer."""
    d = config.hidden_size
    if mlp_type == "dense":
        params = _ffn_one(config, config.intermediate_size)
        return params, params
    experts = config.num_experts * _ffn_one(config, config.expert_size)
    router = d * config.num_experts
    temperature = 0
    if mlp_type == "mot" and config.learnable_temperature != "off":
        temperature = 1 if config.learnable_temperature == "shared" else config.num_experts
    if mlp_type == "mot":
        # E experts each process one mixture per group of G tokens: per token, the work of E/G experts.
        share = 1 / config.group_size
    else:
        # Token Choice sends each token to k experts; Expert Choice processes k tokens per token on average.
        share = config.num_experts_per_tok / config.num_experts
    return experts + router + temperature, round(experts * share) + router + temperature


def _ffn_macs(config, mlp_type: str) -> int:
    """Multiply-adds per token of one feed-forward layer (docs/design.md, "Cost and flop-matching")."""
    d = config.hidden_size
    if mlp_type == "dense":
        return _matrices(config) * d * config.intermediate_size
    expert_macs = _matrices(config) * d * config.expert_size
    if mlp_type == "mot":
        # experts on the merged tokens, plus controller, merge and emit (about 3·d·E)
        return config.num_experts * expert_macs // config.group_size + 3 * d * config.num_experts
    return config.num_experts_per_tok * expert_macs + d * config.num_experts


def model_size(config) -> ModelSize:
    """Parameter counts and forward FLOPs per token of a `MoTConfig`, without building the model."""
    d, vocab, context = config.hidden_size, config.vocab_size, config.max_position_embeddings
    layer_norm = d if config.norm_type == "rmsnorm" else 2 * d  # RMSNorm has no bias
    embeddings = vocab * d + (context * d if config.position_embedding_type == "learned" else 0)
    head = 0 if config.tie_word_embeddings else vocab * d
    # query and output: d x d each; key and value: d x (kv_heads * head_dim) each (grouped-query attention)
    key_value = config.num_key_value_heads * config.head_dim
    attention = 2 * d * d + 2 * d * key_value + ((2 * d + 2 * key_value) if config.attention_bias else 0)
    total = active = embeddings + head + (layer_norm if config.final_norm else 0)
    macs = vocab * d  # output head; embedding lookups cost no multiply-adds
    attention_score_macs = 0
    for mlp_type in config.mlp_types:
        ffn_total, ffn_active = _ffn_params(config, mlp_type)
        total += attention + 2 * layer_norm + ffn_total
        active += attention + 2 * layer_norm + ffn_active
        # projections, then scores (q·k) and mixing (p·v) over the full context
        attention_score_macs += 2 * context * d
        macs += 2 * d * d + 2 * d * key_value + _ffn_macs(config, mlp_type)
    macs += attention_score_macs
    return ModelSize(total, active, 2 * macs, 2 * attention_score_macs)
