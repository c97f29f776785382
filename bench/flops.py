"""FLOP floors: the matmul FLOPs of MoT over those of its flop-matched dense counterpart, for `bench/layer.py`,
`bench/train_throughput.py` and `bench/gpu/compare.py`.

Only matrix products are counted (2 FLOPs per multiply-add); softmax, activations, normalisation, layout copies and
the optimizer are not. Every product's backward is two products of the same size (the gradients of both operands),
so forward+backward is three times the forward, for dense and MoT alike, and a ratio of forwards is the ratio of
forward+backward steps. The one exception is `mot_recompute`, which runs the merge, the experts and the emit forward
a second time in backward.
"""

from __future__ import annotations


def _mlp_matrices(config) -> int:
    return 3 if getattr(config, "gated_mlp", False) else 2


def feed_forward_flops(config, mlp_type: str, recompute: bool = False) -> float:
    """Matmul FLOPs per token of one feed-forward layer, forward+backward.

    dense: `2 * d * d_ff` per weight matrix (two, or three when gated). MoT (group size G, E experts of width f):
    the experts `E * (2 * d * f per matrix) / G` (equal to dense when flop-matched, `E * f / G = d_ff`), plus the
    controller `x W_c` (2 * d * E), the merge (`[E, G] @ [G, d]` per group and position: 2 * E * G * d, i.e.
    2 * d * E per token) and the emit (likewise 2 * d * E): `6 * d * E` over the experts. With `recompute` the
    merge, experts and emit are run forward once more in backward.
    """
    d, matrices = config.hidden_size, _mlp_matrices(config)
    if mlp_type == "dense":
        return 3 * 2 * d * config.intermediate_size * matrices
    if mlp_type != "mot":
        raise ValueError(f"no FLOP count for {mlp_type!r} layers")
    experts = 2 * d * config.expert_size * matrices * config.num_experts / config.group_size
    mixing = 2 * d * config.num_experts  # each of controller, merge and emit
    return 3 * (experts + 3 * mixing) + (experts + 2 * mixing if recompute else 0)


def flop_floor(config, dense_intermediate_size: int | None = None, recompute: bool = False) -> float:
    """FLOP floor of a MoT layer relative to the dense FFN of width `dense_intermediate_size` (default
    `config.intermediate_size`), forward+backward on the same tokens: the least time ratio MoT can reach when both
    run their matmuls equally fast.

    Flop-matched (`E * f / G = d_ff`), non-gated: `(4 * d * d_ff + 6 * d * E) / (4 * d * d_ff)
    = 1 + 1.5 * E / d_ff`; at d_ff = 2048: MoT/32E 1.023, /8 (E = 256) 1.19, /16 (E = 512) 1.375. With `recompute`
    (`mot_recompute`) the forward of merge, experts and emit is paid twice: `(16 * d * d_ff + 22 * d * E) /
    (12 * d * d_ff)`, i.e. 1.36, 1.56, 1.79.
    """
    dense = _DenseShape(config, dense_intermediate_size or config.intermediate_size)
    return feed_forward_flops(config, "mot", recompute) / feed_forward_flops(dense, "dense")


class _DenseShape:
    def __init__(self, config, intermediate_size: int):
        self.hidden_size, self.intermediate_size = config.hidden_size, intermediate_size
        self.gated_mlp = getattr(config, "gated_mlp", False)


def step_flops(config, seq_len: int, recompute: bool | None = None) -> float:
    """Matmul FLOPs per token of one training step of the whole model (forward+backward): per block the attention
    projections, the causal attention itself (each token attends to (S + 1) / 2 positions on average) and the
    feed-forward of its type; then the output head. `recompute` defaults to `config.mot_recompute`. Routed types
    other than MoT have no count here (ValueError)."""
    recompute = getattr(config, "mot_recompute", False) if recompute is None else recompute
    d = config.hidden_size
    kv_width = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv_width *= d // config.num_attention_heads
    projections = 2 * d * (2 * d + 2 * kv_width)  # q and o: d x d; k and v: d x kv_width
    attention = 2 * 2 * d * (seq_len + 1) / 2  # q k^T and (weights) v over the causal prefix
    total = 0.0
    for mlp_type in config.mlp_types:
        total += 3 * (projections + attention) + feed_forward_flops(config, mlp_type, recompute)
    return total + 3 * 2 * d * config.vocab_size
