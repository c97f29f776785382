"""Mixture of Tokens (MoT) causal language model for Hugging Face Transformers.

Mixture of Tokens (Antoniak et al., "Mixture of Tokens: Continuous MoE through Cross-Example Aggregation",
arXiv 2310.15961) replaces the feed-forward layer of a Transformer block by a continuous mixture of experts:
the tokens at one position of `group_size` different sequences are mixed, per expert, into one token (softmax
over the group), each expert processes its mixed token, and the outputs are redistributed to the group's
tokens with the same weights. Tokens at different positions never mix, so the model stays causal.

The same file also holds the baselines of the paper: a dense feed-forward layer, Token Choice (Switch) and
Expert Choice. The routed layers share their parameter names (`router`, `w1`, `w2`), so a MoT checkpoint
becomes a Token Choice model by changing only the config (the paper's transition tuning).

This file holds the method and transformers' plumbing; its performance paths (the chunked training loss, layout
helpers) are in `performance_mot.py`. Both, with `configuration_mot.py`, travel to the Hub as custom code
(`trust_remote_code=True`): they import only each other and installed packages.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple, logging

from .configuration_mot import MoTConfig

# The performance paths (the chunked training loss, layout changes with contiguous gradients) live apart in
# performance_mot.py, which travels to the Hub with this file; they compute exactly what their plain versions do.
from .performance_mot import ContiguousTranspose, chunked_lm_loss, compute_dtype, drop_group_padding

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the KV cache from `past_key_values` to `cache`: in `forward`'s arguments (what
# `generate()` passes) and in the fields of model outputs. The releases before it use the old name. This file follows
# the installed release: it takes both argument names and fills the output field that the release declares.
CACHE_NAME = "cache" if "cache" in {field.name for field in fields(MoeModelOutputWithPast)} else "past_key_values"


def merge_cache_arguments(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache given to `forward` under either name (see `CACHE_NAME`); the old name is deprecated where the
    installed transformers has the new one, as in its own models."""
    if past_key_values is None:
        return cache
    if cache is not None:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    if CACHE_NAME == "cache" and not torch.compiler.is_compiling():
        warnings.warn("`past_key_values` is deprecated since transformers 5.24: pass the KV cache as `cache`",
                      FutureWarning, stacklevel=3)
    return past_key_values


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------


@dataclass
class MoTModelOutputWithPast(MoeModelOutputWithPast):
    """`MoeModelOutputWithPast` plus `routing_stats`: one dict of scalar tensors per block (None for dense
    blocks), filled when `output_routing_stats=True`."""

    routing_stats: tuple[dict[str, torch.Tensor] | None, ...] | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class MoTCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus per-block `routing_stats` (see `MoTModelOutputWithPast`)."""

    routing_stats: tuple[dict[str, torch.Tensor] | None, ...] | None = None


@dataclass
class FeedForwardOutput:
    """What a feed-forward layer hands back to its block besides the hidden states."""

    aux_loss: torch.Tensor | None = None  # weighted router losses of Token Choice, part of the training loss
    router_logits: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] | None = None


# --------------------------------------------------------------------------------------------------------------
# Norms and positions
# --------------------------------------------------------------------------------------------------------------


class MoTRMSNorm(nn.Module):
    """Llama's RMSNorm: scale by the root mean square (computed in fp32), then by a learned weight."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden_states.to(input_dtype)


def make_norm(config: MoTConfig) -> nn.Module:
    """The block's and the final norm: LayerNorm (the paper) or RMSNorm (`norm_type="rmsnorm"`)."""
    if config.norm_type == "rmsnorm":
        return MoTRMSNorm(config.hidden_size, config.rms_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class MoTRotaryEmbedding(nn.Module):
    """cos/sin of rotary position embeddings (`position_embedding_type="rope"`), from `config.rope_parameters` with
    transformers' own RoPE utilities (every `rope_type` they know: default, linear, dynamic, yarn, llama3, ...)."""

    def __init__(self, config: MoTConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        # Read by transformers' dynamic_rope_update (the "dynamic" and "longrope" types).
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        inv_freq, self.attention_scaling = self.rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @property
    def rope_init_fn(self) -> Callable:
        if self.rope_type == "default":
            return self.compute_default_rope_parameters
        if self.rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"rope_type {self.rope_type!r} is not one transformers knows: "
                             f"default, {', '.join(ROPE_INIT_FUNCTIONS)}")
        return ROPE_INIT_FUNCTIONS[self.rope_type]

    @staticmethod
    def compute_default_rope_parameters(config: MoTConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        """The original RoPE: inverse frequencies `theta ** (-2i / head_dim)`, no scaling of cos/sin."""
        dim = config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim
        return 1.0 / (config.rope_parameters["rope_theta"] ** exponents), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [B, S, 1] * [head_dim / 2] -> angles [B, S, head_dim / 2], repeated for the two rotated halves
        angles = position_ids[..., None].float() * self.inv_freq.to(x.device)
        angles = torch.cat((angles, angles), dim=-1)  # [B, S, head_dim]
        return ((angles.cos() * self.attention_scaling).to(x.dtype),
                (angles.sin() * self.attention_scaling).to(x.dtype))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate query and key `[B, heads, S, head_dim]` by their positions' angles (cos/sin `[B, S, head_dim]`)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin


# --------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    # query: [batch, heads, seq, head_dim]; key/value: [batch, kv_heads, kv_len, head_dim]; attention_mask: additive
    # [batch, 1, q_len, kv_len]. Grouped-query attention: query head i reads key/value head i // groups.
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # [batch, seq, heads, head_dim]
    return output, weights


class MoTAttention(nn.Module):
    """Causal self-attention, multi-head (the paper: bias-free) or grouped-query (`num_key_value_heads`), with
    rotary embeddings when the model uses them, dispatched through transformers' attention interface."""

    def __init__(self, config: MoTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads  # read by transformers' integrations
        # One projection for query, key and value, in that order: heads + 2 * kv_heads blocks of head_dim features.
        projected = (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, projected, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, hidden_size = hidden_states.shape
        # [B, S, (heads + 2 kv_heads) * head_dim] -> [B, heads + 2 kv_heads, S, head_dim] -> query, key, value
        qkv = self.qkv_proj(hidden_states).view(batch_size, seq_len, -1, self.head_dim).transpose(1, 2)
        query, key, value = qkv.split([self.num_heads, self.num_key_value_heads, self.num_key_value_heads], dim=1)
        if position_embeddings is not None:
            query, key = apply_rotary(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        return self.o_proj(output.reshape(batch_size, seq_len, -1)), weights


# --------------------------------------------------------------------------------------------------------------
# Feed-forward layers
# --------------------------------------------------------------------------------------------------------------


class DenseFeedForward(nn.Module):
    """The dense baseline: `act(x W_up) W_down` (the paper: ReLU, no biases), or gated (`gated_mlp`, Llama's
    SwiGLU with silu): `(act(x W_gate) * (x W_up)) W_down`."""

    def __init__(self, config: MoTConfig):
        super().__init__()
        size, width, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(size, width, bias=bias) if config.gated_mlp else None
        self.up_proj = nn.Linear(size, width, bias=bias)
        self.down_proj = nn.Linear(width, size, bias=bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states, token_mask=None, output_stats=False):
        hidden = self.up_proj(hidden_states)
        hidden = self.act(hidden) if self.gate_proj is None else self.act(self.gate_proj(hidden_states)) * hidden
        return self.down_proj(hidden), FeedForwardOutput()


def group_rows(
    hidden_states: torch.Tensor, token_mask: torch.Tensor | None, group_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split the batch into groups of `group_size` contiguous rows (the MoT and Expert Choice grouping).

    A batch that is not a multiple of `group_size` is padded with masked zero rows, so the last group is
    effectively smaller and the full groups are computed exactly as without it.
    Returns hidden states `[num_groups, G, S, d]` and a boolean mask `[num_groups, G, S, 1]` (or None).
    """
    batch_size, seq_len, hidden_size = hidden_states.shape
    missing = -batch_size % group_size
    if missing:
        hidden_states = F.pad(hidden_states, (0, 0, 0, 0, 0, missing))
        if token_mask is None:
            token_mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=hidden_states.device)
        token_mask = F.pad(token_mask, (0, 0, 0, missing), value=False)
    if batch_size < group_size or missing:
        logger.warning_once(
            f"A Mixture of Tokens layer ran with groups smaller than group_size={group_size} (batch of "
            f"{batch_size} sequences). Outputs depend on which sequences share a group; a model trained with full "
            "groups sees a different mixture, and with one sequence per group it acts as a dense layer of width "
            "num_experts * expert_size."
        )
    num_groups = hidden_states.shape[0] // group_size
    grouped = hidden_states.view(num_groups, group_size, seq_len, hidden_size)
    if token_mask is not None:
        token_mask = token_mask.view(num_groups, group_size, seq_len, 1)
    return grouped, token_mask


class RoutedFeedForward(nn.Module):
    """Parameters shared by every routed layer: a router `[d, E]` and `E` experts `W1 [E, d, f]`, `W2 [E, f, d]`
    (with `gated_mlp` also `W_gate [E, d, f]`; with `mlp_bias` biases `b1`, `b2`, `b_gate`). Each expert computes
    what the dense feed-forward layer computes, with its own weights.

    Keeping one set of names for MoT, Token Choice and Expert Choice makes a checkpoint of one loadable as
    another by changing only `mlp_types` in the config.
    """

    def __init__(self, config: MoTConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        experts, size, width = config.num_experts, config.hidden_size, config.expert_size
        self.router = nn.Parameter(torch.empty(size, experts))
        self.w1 = nn.Parameter(torch.empty(experts, size, width))
        self.w2 = nn.Parameter(torch.empty(experts, width, size))
        self.w_gate = nn.Parameter(torch.empty(experts, size, width)) if config.gated_mlp else None
        bias = config.mlp_bias
        self.b1 = nn.Parameter(torch.empty(experts, width)) if bias else None
        self.b2 = nn.Parameter(torch.empty(experts, size)) if bias else None
        self.b_gate = nn.Parameter(torch.empty(experts, width)) if bias and config.gated_mlp else None
        self.act = ACT2FN[config.hidden_act]

    @staticmethod
    def _project(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`[E, N, a] @ [E, a, b] (+ [E, b])` -> `[E, N, b]`."""
        return torch.bmm(inputs, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), inputs, weight)

    def run_experts(self, expert_inputs: torch.Tensor) -> torch.Tensor:
        """`[E, N, d]` -> `[E, N, d]`: expert `e` processes row block `e`."""
        hidden = self._project(expert_inputs, self.w1, self.b1)  # [E, N, f]
        if self.w_gate is not None:
            hidden = self.act(self._project(expert_inputs, self.w_gate, self.b_gate)) * hidden
        elif isinstance(self.act, nn.ReLU):
            # In place: bmm keeps its inputs, not its output, for backward, so this saves an [E, N, f] tensor.
            hidden = hidden.relu_()
        else:
            hidden = self.act(hidden)
        return self._project(hidden, self.w2, self.b2)

    def run_one_expert(self, expert: int, inputs: torch.Tensor) -> torch.Tensor:
        """`[N, d]` -> `[N, d]` through expert `expert` alone."""

        def project(x, weight, bias):
            return x @ weight[expert] if bias is None else x @ weight[expert] + bias[expert]

        hidden = project(inputs, self.w1, self.b1)
        gate = None if self.w_gate is None else project(inputs, self.w_gate, self.b_gate)
        hidden = self.act(hidden) if gate is None else self.act(gate) * hidden
        return project(hidden, self.w2, self.b2)


MIN_LOG_TEMPERATURE = math.log(1e-4)


def _entropy(probs: torch.Tensor, dim: int) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-20).log()).sum(dim)


class MixtureOfTokens(RoutedFeedForward):
    """The MoT layer (DESIGN §1).

    For each group (contiguous block of `G` rows) and position: logits `x W_c`, weights = softmax over the
    group's tokens (separately per expert) of `logits / T`; expert `e` gets `sum_g w[g, e] x[g]`, and token `g`
    receives `sum_e w[g, e] expert_e(...)`.
    """

    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.group_size = config.group_size
        self.routing = config.mot_routing
        if config.learnable_temperature == "off":
            self.log_temperature = None
        else:
            # T = exp(p) keeps the learned temperature positive whatever the optimizer does.
            shape = (1,) if config.learnable_temperature == "shared" else (config.num_experts,)
            self.log_temperature = nn.Parameter(torch.full(shape, math.log(config.mot_temperature)))

    def temperature(self) -> torch.Tensor | float:
        if self.log_temperature is None:
            return self.config.mot_temperature
        # Floor at 1e-4 (the discrete limit for all practical purposes): exp of a very negative p underflows to 0.
        return self.log_temperature.clamp_min(MIN_LOG_TEMPERATURE).exp()

    def mixing_weights(self, grouped: torch.Tensor, group_mask: torch.Tensor | None) -> torch.Tensor:
        """Tokens with the group on dim 1 (`[p, G, d]` or `[n, G, S, d]`) -> weights with E last, normalised over
        the group (dim 1)."""
        if self.routing == "uniform":
            # The paper's "uniform routing" ablation: a controller frozen at zero.
            logits = grouped.new_zeros(*grouped.shape[:-1], self.num_experts)
        else:
            logits = grouped @ self.router
            temperature = self.temperature()
            if not (isinstance(temperature, float) and temperature == 1.0):  # the paper's fixed T = 1
                logits = logits / temperature
        if group_mask is not None:
            # A padded token must take no part in any mixture: a very negative logit (not -inf, which would make
            # an all-padding group NaN) and, below, a weight multiplied by zero.
            logits = logits.masked_fill(~group_mask, torch.finfo(logits.dtype).min)
        weights = torch.softmax(logits, dim=1)
        if self.routing == "discrete":
            # Temperature -> 0: each expert takes only its highest-scoring token. In training the soft weights
            # carry the gradient (straight-through), so the controller still learns.
            hard = F.one_hot(weights.argmax(dim=1), weights.shape[1]).movedim(-1, 1).to(weights.dtype)
            weights = hard + (weights - weights.detach()) if self.training else hard
        if group_mask is not None:
            weights = weights * group_mask
        return weights

    def forward(self, hidden_states, token_mask=None, output_stats=False):
        batch_size, seq_len, hidden_size = hidden_states.shape
        # Cast once (autocast would cast again for every matmul that reads the tokens).
        hidden_states = hidden_states.to(compute_dtype(hidden_states))
        grouped, group_mask = group_rows(hidden_states, token_mask, self.group_size)  # [n, G, S, d]
        num_groups, group_size = grouped.shape[:2]
        # Position-major: one [G, d] matrix per (group, position) p. Everything below is then a contiguous or
        # plainly transposed operand of a batched matmul (permuting the small weight tensors in the other
        # layout is a cache-hostile gather that costs more than this one copy of the tokens).
        tokens = ContiguousTranspose.apply(grouped, 1, 2).view(-1, group_size, hidden_size)  # [p, G, d]
        if group_mask is not None:
            group_mask = group_mask.transpose(1, 2).reshape(-1, group_size, 1)  # [p, G, 1]
        # Steps 1-2 (DESIGN §1): controller logits, softmax over the group's tokens for each expert.
        weights = self.mixing_weights(tokens, group_mask)  # [p, G, E], softmax over G; fp32 under autocast
        mixing = weights.to(tokens.dtype)
        # Step 3, merge: one mixed token per expert, m_e = sum_g w[g, e] x[g].
        merged = torch.bmm(mixing.transpose(1, 2), tokens)  # [p, E, G] @ [p, G, d] -> [p, E, d]
        # Step 4, process: expert e on its mixed token of every (group, position).
        processed = self.run_experts(ContiguousTranspose.apply(merged, 0, 1))  # [E, p, d]
        # Step 5, emit with the same weights: y[g] = sum_e w[g, e] h_e.
        output = torch.bmm(mixing, ContiguousTranspose.apply(processed, 0, 1))  # [p, G, E] @ [p, E, d]
        # [p, G, d] = [n, S, G, d] -> [n, G, S, d] -> [B, S, d]
        output = ContiguousTranspose.apply(output.view(num_groups, seq_len, group_size, hidden_size), 1, 2)
        output = drop_group_padding(output.view(-1, seq_len, hidden_size), batch_size)

        return output, FeedForwardOutput(stats=self.mixing_stats(weights) if output_stats else None)

    @torch.no_grad()
    def mixing_stats(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Routing statistics of weights with the group on dim 1."""
        probs = weights.float()
        return {
            # entropy of each expert's mixture over the group, averaged over experts and groups
            "mixing_entropy": _entropy(probs, dim=1).mean(),
            "max_weight": probs.amax(dim=1).mean(),
            "temperature": torch.as_tensor(self.temperature(), dtype=torch.float32).detach().mean(),
        }


class TokenChoice(RoutedFeedForward):
    """Token Choice (Switch) routing: softmax over experts per token, top-k, output scaled by the router
    probability. While training each expert takes at most `capacity_factor * tokens * k / E` tokens (the rest
    are dropped); in eval mode it is dropless, so a sequence's output never depends on the rest of the batch.
    """

    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.top_k = config.num_experts_per_tok
        self.capacity_factor = config.capacity_factor

    def forward(self, hidden_states, token_mask=None, output_stats=False):
        batch_size, seq_len, hidden_size = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden_size)  # [N, d]
        router_logits = tokens @ self.router  # [N, E]
        probs = torch.softmax(router_logits.float(), dim=-1)
        gate, expert_index = probs.topk(self.top_k, dim=-1)  # [N, k]
        valid = None if token_mask is None else token_mask.reshape(-1)

        # Assignments in priority order: every token's first choice before any second choice (Switch/GShard).
        assigned_expert = expert_index.t().reshape(-1)  # [k*N]
        assigned_token = torch.arange(tokens.shape[0], device=tokens.device).repeat(self.top_k)
        assigned_gate = gate.t().reshape(-1)
        if valid is not None:
            keep = valid.repeat(self.top_k)
            assigned_expert, assigned_token, assigned_gate = (
                assigned_expert[keep], assigned_token[keep], assigned_gate[keep]
            )
        num_real_tokens = tokens.shape[0] if valid is None else valid.sum()

        output = torch.zeros_like(tokens)
        if self.training:
            dropped = self._dispatch_with_capacity(
                tokens, output, assigned_expert, assigned_token, assigned_gate, num_real_tokens
            )
        else:
            self._dispatch_dropless(tokens, output, assigned_expert, assigned_token, assigned_gate)
            dropped = None

        # Load balancing (DESIGN §3): E * sum_e (mean router prob of e) * (fraction of assignments to e).
        real_probs = probs if valid is None else probs[valid]
        assignment_fraction = torch.bincount(assigned_expert, minlength=self.num_experts).float()
        assignment_fraction = assignment_fraction / assignment_fraction.sum().clamp_min(1)
        balance_loss = self.num_experts * (real_probs.mean(0) * assignment_fraction).sum()
        real_logits = router_logits if valid is None else router_logits[valid]
        z_loss = torch.logsumexp(real_logits.float(), dim=-1).square().mean()
        aux_loss = self.config.router_aux_loss_coef * balance_loss + self.config.router_z_loss_coef * z_loss

        stats = None
        if output_stats:
            with torch.no_grad():
                stats = {
                    "balance_loss": balance_loss.detach(),
                    "z_loss": z_loss.detach(),
                    "expert_load_max": assignment_fraction.max() * self.num_experts,  # 1 = perfectly balanced
                    "router_entropy": _entropy(real_probs, dim=-1).mean(),
                    "dropped_fraction": torch.zeros(()) if dropped is None else dropped,
                    "expert_load": assignment_fraction,
                }
        output = output.view(batch_size, seq_len, hidden_size)
        return output, FeedForwardOutput(aux_loss=aux_loss, router_logits=router_logits, stats=stats)

    def _dispatch_with_capacity(self, tokens, output, expert, token, gate, num_real_tokens) -> torch.Tensor:
        """Static-shape training path: scatter into `[E, capacity, d]`, one batched matmul, gather back."""
        capacity = max(1, math.ceil(self.capacity_factor * int(num_real_tokens) * self.top_k / self.num_experts))
        # Position of each assignment in its expert's queue, in priority order.
        one_hot = F.one_hot(expert, self.num_experts)  # [A, E]
        position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # [A]
        fits = position < capacity
        slot = (expert * capacity + position)[fits]
        expert_inputs = tokens.new_zeros(self.num_experts * capacity, tokens.shape[1])
        expert_inputs[slot] = tokens[token[fits]]
        expert_outputs = self.run_experts(expert_inputs.view(self.num_experts, capacity, -1))
        weighted = expert_outputs.view(-1, tokens.shape[1])[slot] * gate[fits, None].to(tokens.dtype)
        # index_put_(accumulate=True), not index_add_: the latter is orders of magnitude slower on CPU (torch 2.13).
        output.index_put_((token[fits],), weighted, accumulate=True)
        return 1.0 - fits.float().mean() if fits.numel() else torch.zeros(())

    def _dispatch_dropless(self, tokens, output, expert, token, gate) -> None:
        """Eval path: every assignment is processed, expert by expert, so nothing depends on the batch."""
        order = torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        start = 0
        for expert_id, count in enumerate(counts):
            if count:
                chosen = order[start : start + count]
                rows = token[chosen]
                result = self.run_one_expert(expert_id, tokens[rows]) * gate[chosen, None].to(tokens.dtype)
                output.index_put_((rows,), result, accumulate=True)
                start += count


class ExpertChoice(RoutedFeedForward):
    """Expert Choice: within the same cross-example groups as MoT (`G` rows at one position), each expert picks
    its `k * G / E` highest-scoring tokens (scores: softmax over experts per token) and scales its output by
    the score. Groups at one position keep the layer causal."""

    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.group_size = config.group_size
        self.tokens_per_expert = max(1, min(config.group_size,
                                            round(config.num_experts_per_tok * config.group_size / config.num_experts)))

    def forward(self, hidden_states, token_mask=None, output_stats=False):
        batch_size, seq_len, hidden_size = hidden_states.shape
        grouped, group_mask = group_rows(hidden_states, token_mask, self.group_size)  # [n, G, S, d]
        num_groups, group_size = grouped.shape[:2]
        capacity = min(self.tokens_per_expert, group_size)
        scores = torch.softmax((grouped @ self.router).float(), dim=-1)  # [n, G, S, E]
        if group_mask is not None:
            scores = scores * group_mask  # a padded token scores 0: picked only if nothing else is left

        # Each expert's choice within its group: [n, S, E, G] -> top-c over G -> [n, S, E, c]
        choice_score, choice = scores.permute(0, 2, 3, 1).topk(capacity, dim=-1)
        by_position = grouped.transpose(1, 2)  # [n, S, G, d]
        flat_choice = choice.reshape(num_groups, seq_len, -1, 1)  # [n, S, E*c, 1]
        picked = by_position.gather(2, flat_choice.expand(-1, -1, -1, hidden_size))  # [n, S, E*c, d]
        # [n, S, E, c, d] -> [E, n*S*c, d]
        expert_inputs = picked.view(num_groups, seq_len, self.num_experts, capacity, hidden_size)
        expert_inputs = expert_inputs.permute(2, 0, 1, 3, 4).reshape(self.num_experts, -1, hidden_size)
        expert_outputs = self.run_experts(expert_inputs)
        expert_outputs = expert_outputs.view(self.num_experts, num_groups, seq_len, capacity, hidden_size)
        expert_outputs = expert_outputs.permute(1, 2, 0, 3, 4) * choice_score.unsqueeze(-1).to(grouped.dtype)
        output = torch.zeros_like(by_position).scatter_add_(
            2, flat_choice.expand(-1, -1, -1, hidden_size),
            expert_outputs.reshape(num_groups, seq_len, -1, hidden_size),
        )  # [n, S, G, d]
        output = drop_group_padding(output.transpose(1, 2).reshape(-1, seq_len, hidden_size), batch_size)

        stats = None
        if output_stats:
            with torch.no_grad():
                load = torch.zeros(num_groups, seq_len, group_size, device=scores.device)
                load.scatter_add_(2, choice.reshape(num_groups, seq_len, -1), torch.ones_like(choice_score).flatten(2))
                stats = {"unprocessed_fraction": (load == 0).float().mean()}
        return output, FeedForwardOutput(stats=stats)


FEED_FORWARD_CLASSES = {
    "dense": DenseFeedForward,
    "mot": MixtureOfTokens,
    "token_choice": TokenChoice,
    "expert_choice": ExpertChoice,
}


# --------------------------------------------------------------------------------------------------------------
# Blocks and models
# --------------------------------------------------------------------------------------------------------------


class MoTBlock(GradientCheckpointingLayer):
    """Pre-norm Transformer block whose feed-forward type is `config.mlp_types[layer_idx]`."""

    def __init__(self, config: MoTConfig, layer_idx: int):
        super().__init__()
        self.mlp_type = config.mlp_types[layer_idx]
        self.attn_norm = make_norm(config)
        self.self_attn = MoTAttention(config, layer_idx)
        self.mlp_norm = make_norm(config)
        self.mlp = FEED_FORWARD_CLASSES[self.mlp_type](config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_routing_stats: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, FeedForwardOutput]:
        attn_output, attn_weights = self.self_attn(self.attn_norm(hidden_states), attention_mask, cache=cache, **kwargs)
        hidden_states = hidden_states + attn_output
        mlp_output, routing = self.mlp(self.mlp_norm(hidden_states), token_mask, output_routing_stats)
        return hidden_states + mlp_output, attn_weights, routing


class MoTPreTrainedModel(PreTrainedModel):
    config_class = MoTConfig
    config: MoTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoTBlock"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        # The paper's code: truncated normal, std = sqrt(init_scale / fan_in), cut at two std.
        scale = self.config.init_scale

        def truncated(tensor, fan_in):
            std = math.sqrt(scale / fan_in)
            init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)

        if isinstance(module, nn.Linear):
            truncated(module.weight, module.in_features)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) and self.config.embedding_init == "unit_fan_in":
            # The authors' embeddings: fan-in 1 and a cut at +-2 * init_scale (not two std): std about 0.11.
            init.trunc_normal_(module.weight, mean=0.0, std=math.sqrt(scale), a=-2 * scale, b=2 * scale)
        elif isinstance(module, nn.Embedding):
            truncated(module.weight, module.embedding_dim)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MoTRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MoTRotaryEmbedding):  # buffers are not saved: recomputed from the config
            inv_freq, _ = module.rope_init_fn(module.config)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)
        elif isinstance(module, RoutedFeedForward):
            truncated(module.router, self.config.hidden_size)
            truncated(module.w1, self.config.hidden_size)
            truncated(module.w2, self.config.expert_size)
            if module.w_gate is not None:
                truncated(module.w_gate, self.config.hidden_size)
            for bias in (module.b1, module.b2, module.b_gate):
                if bias is not None:
                    init.zeros_(bias)
            if getattr(module, "log_temperature", None) is not None:
                init.constant_(module.log_temperature, math.log(self.config.mot_temperature))


class MoTModel(MoTPreTrainedModel):
    """The decoder: token embeddings, learned absolute position embeddings (the paper) or rotary ones in every
    attention layer, `num_hidden_layers` blocks, final norm."""

    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        learned = config.position_embedding_type == "learned"
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size) if learned else None
        self.rotary_emb = None if learned else MoTRotaryEmbedding(config)
        self.layers = nn.ModuleList(MoTBlock(config, i) for i in range(config.num_hidden_layers))
        # The authors' code has no final norm (config.final_norm=False); an Identity keeps the forward one path.
        self.norm = make_norm(config) if config.final_norm else nn.Identity()
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_routing_stats: bool | None = None,
        output_router_logits: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> MoTModelOutputWithPast:
        r"""
        cache: the KV cache (a `Cache`) of earlier tokens; `past_key_values` is its name before transformers 5.24
            and is still accepted.
        output_routing_stats: return per-block routing statistics (`routing_stats`).
        output_router_logits: return the Token Choice router logits (`router_logits`, one `[tokens, E]` tensor per
            Token Choice block). The router losses do not depend on it: they are always in `aux_loss`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = merge_cache_arguments(cache, past_key_values)
        # None falls back to the config (the transformers convention), an explicit value wins.
        config = self.config
        use_cache = config.use_cache if use_cache is None else use_cache
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_routing_stats = config.output_routing_stats if output_routing_stats is None else output_routing_stats
        output_router_logits = config.output_router_logits if output_router_logits is None else output_router_logits
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=config)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]
        past_length = cache.get_seq_length() if cache is not None else 0
        if self.embed_positions is not None and past_length + seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {past_length + seq_len} (cached {past_length} + new {seq_len}) exceeds "
                f"max_position_embeddings={self.config.max_position_embeddings} of this model"
            )

        # Padding mask of the new tokens, [B, S]; None when nothing is padded (the fast path).
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -seq_len:].bool()
            if bool(token_mask.all()):
                token_mask = None
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
                # Left padding: count real tokens only (the same rule as `generate()`).
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -seq_len:]
            else:
                position_ids = torch.arange(past_length, past_length + seq_len, device=inputs_embeds.device)
                position_ids = position_ids.unsqueeze(0)

        # The cache goes positionally: its keyword is `cache` from transformers 5.24 and `past_key_values` before.
        causal_mask = create_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids=position_ids)
        if self.embed_positions is not None:
            hidden_states, position_embeddings = inputs_embeds + self.embed_positions(position_ids), None
        else:
            hidden_states, position_embeddings = inputs_embeds, self.rotary_emb(inputs_embeds, position_ids)

        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        routing = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, attn_weights, layer_routing = layer(
                hidden_states,
                attention_mask=causal_mask,
                token_mask=token_mask,
                cache=cache,
                output_routing_stats=output_routing_stats,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            routing.append(layer_routing)
            if output_attentions:
                all_attentions += (attn_weights,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        aux_losses = [r.aux_loss for r in routing if r.aux_loss is not None]
        router_logits = None
        if output_router_logits:
            router_logits = tuple(r.router_logits for r in routing if r.router_logits is not None) or None
        return MoTModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{CACHE_NAME: cache if use_cache else None},
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            router_logits=router_logits,
            routing_stats=tuple(r.stats for r in routing) if output_routing_stats else None,
            # Averaged over the routed layers, so the coefficient means the same at any depth.
            aux_loss=torch.stack(aux_losses).mean() if aux_losses else None,
        )


class MoTForCausalLM(MoTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.model = MoTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_routing_stats: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> MoTCausalLMOutputWithPast:
        r"""
        cache: the KV cache (a `Cache`) of earlier tokens; `past_key_values` is its name before transformers 5.24
            and is still accepted.
        labels: token ids for the language-modelling loss (shifted inside; -100 is ignored).
        output_routing_stats: return per-block routing statistics (`routing_stats`).
        output_router_logits: return the Token Choice router logits (`router_logits`).

        While training with `labels` and `config.chunked_lm_loss` (the default), the loss is computed without
        materialising the logits and `logits` is None (see `ChunkedLMLoss`).

        While training, the Token Choice router losses (`aux_loss`) are added to `loss`. Under gradient
        accumulation (Trainer passes `num_items_in_batch`), they are weighted by this micro-batch's share of the
        label tokens, like the language-modelling loss, so accumulation never over-counts them.
        """
        outputs: MoTModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=merge_cache_arguments(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_routing_stats=output_routing_stats,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = loss = None
        chunked = (labels is not None and self.training and self.config.chunked_lm_loss and torch.is_grad_enabled()
                   and isinstance(logits_to_keep, int) and logits_to_keep == 0)
        if chunked:
            loss = chunked_lm_loss(hidden_states, labels, self.lm_head.weight, **kwargs)
        else:
            logits = self.lm_head(hidden_states)
            if labels is not None:
                loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        if loss is not None:
            if self.training and outputs.aux_loss is not None:
                share = 1.0
                num_items_in_batch = kwargs.get("num_items_in_batch")
                if num_items_in_batch is not None:
                    local_items = (labels[..., 1:] != -100).sum()
                    share = local_items / torch.as_tensor(num_items_in_batch, device=labels.device)
                loss = loss + outputs.aux_loss.to(loss.device) * share

        return MoTCausalLMOutputWithPast(
            loss=loss,
            aux_loss=outputs.aux_loss,
            logits=logits,
            **{CACHE_NAME: outputs.get(CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            routing_stats=outputs.routing_stats,
        )


__all__ = [
    "MoTPreTrainedModel",
    "MoTModel",
    "MoTForCausalLM",
    "MixtureOfTokens",
    "TokenChoice",
    "ExpertChoice",
    "DenseFeedForward",
]
