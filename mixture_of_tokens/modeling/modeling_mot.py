# Copyright 2026 The mixture-of-tokens authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Mixture of Tokens (MoT) causal language model for Hugging Face Transformers.

Mixture of Tokens (Antoniak et al., "Mixture of Tokens: Continuous MoE through Cross-Example Aggregation",
arXiv 2310.15961) replaces the feed-forward layer of a Transformer block by a continuous mixture of experts:
the tokens at one position of `group_size` different sequences are mixed, per expert, into one token (softmax
over the group), each expert processes its mixed token, and the outputs are redistributed to the group's
tokens with the same weights. Tokens at different positions never mix, so the model stays causal.

The layout is that of transformers' MoE models (OLMoE, Qwen2-MoE): attention `q/k/v/o_proj`, `input_layernorm`,
`post_attention_layernorm`, and in routed blocks a router module `mlp.gate` (`.weight [E, d]`) and an experts
module `mlp.experts` (`gate_up_proj [E, d, 2f]` or `up_proj [E, d, f]`, `down_proj [E, f, d]`). The MoT, Token
Choice and Expert Choice layers are short compositions of the two and share their names, so a MoT checkpoint
becomes a Token Choice model by changing only `mlp_types` (the paper's transition tuning). Token Choice sends its
tokens through transformers' experts interface (`experts_implementation=`: eager, batched_mm, grouped_mm, ...).

This file holds the method and transformers' plumbing; its performance paths (the chunked training loss, layout
helpers) are in `performance_mot.py`, the loading of checkpoints with earlier parameter names in `legacy_mot.py`.
They, with `configuration_mot.py`, travel to the Hub as custom code (`trust_remote_code=True`): they import only
each other and installed packages. The method's design is in the repository's docs/design.md.
"""

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import auto_docstring, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_mot import MoTConfig
from .legacy_mot import read_legacy_checkpoint

# The performance paths (the chunked training loss, layout changes with contiguous gradients, MoT's merge and emit
# with expert-major copies where batched matmuls copy strided operands, or through kernels handed in, and the
# experts' products through kernels handed in) live apart in performance_mot.py, which travels to the Hub with this
# file; they compute exactly what their plain versions do.
from .performance_mot import (
    ContiguousTranspose,
    EmitExpertMajor,
    EmitWithKernels,
    MergeExpertMajor,
    MergeWithKernels,
    batched_matmul_copies_views,
    chunked_lm_loss,
    compute_dtype,
    drop_group_padding,
    expert_product,
)

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


@auto_docstring(custom_intro="`MoeModelOutputWithPast` with the routing outputs of MoT and Expert Choice layers.")
@dataclass
class MoTModelOutputWithPast(MoeModelOutputWithPast):
    r"""
    controller_logits (`tuple[torch.Tensor]`, *optional*, returned when `output_controller_logits=True`):
        MoT's and Expert Choice's controller logits, one tensor per block, E last, in their group layout.
    routing_stats (`tuple[dict[str, torch.Tensor]]`, *optional*, returned when `output_routing_stats=True`):
        One dict of statistics per routed block, in block order.
    """

    controller_logits: tuple[torch.Tensor, ...] | None = None
    routing_stats: tuple[dict[str, torch.Tensor], ...] | None = None


@auto_docstring(custom_intro="`MoeCausalLMOutputWithPast` with the routing outputs of MoT and Expert Choice layers.")
@dataclass
class MoTCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `labels` is provided):
        The language-modelling loss, plus the Token Choice router losses while training.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, config.vocab_size)`, *optional*):
        The head's scores for each vocabulary token; None while training with `chunked_lm_loss`.
    controller_logits (`tuple[torch.Tensor]`, *optional*, returned when `output_controller_logits=True`):
        MoT's and Expert Choice's controller logits, one tensor per block, E last, in their group layout.
    routing_stats (`tuple[dict[str, torch.Tensor]]`, *optional*, returned when `output_routing_stats=True`):
        One dict of statistics per routed block, in block order.
    """

    controller_logits: tuple[torch.Tensor, ...] | None = None
    routing_stats: tuple[dict[str, torch.Tensor], ...] | None = None


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
    # CODEPATH: "layernorm": the paper's presets (transformer-medium, mot-medium-32e*, tiny-mot); "rmsnorm": the
    # modern presets (modern-*, tiny-modern-*).
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
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

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
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.attention_bias)
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
        # [B, S, heads * head_dim] -> [B, heads, S, head_dim] (kv_heads for key and value)
        shape = (batch_size, seq_len, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if position_embeddings is not None:
            query, key = apply_rotary(query, key, *position_embeddings)
        if cache is not None:
            # `kwargs`: the paged cache of continuous batching updates the attention arguments in place.
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        return self.o_proj(output.reshape(batch_size, seq_len, -1)), weights


# --------------------------------------------------------------------------------------------------------------
# Feed-forward layers: dense, and the routed ones composed of a router and an experts module
# --------------------------------------------------------------------------------------------------------------


def feed_forward_activation(hidden: torch.Tensor, act_fn: Callable, up: torch.Tensor | None = None) -> torch.Tensor:
    """What every feed-forward layer computes between its two projections, the dense one and each expert alike:
    `act(x W_up)` from `hidden = x W_up`, or gated, `act(x W_gate) * (x W_up)` from `hidden = x W_gate` and `up`."""
    if up is not None:
        return act_fn(hidden) * up
    # In place for ReLU: a matmul keeps its inputs, not its output, for backward, so this saves a tensor as large as
    # the hidden activations.
    return hidden.relu_() if isinstance(act_fn, nn.ReLU) else act_fn(hidden)


class DenseFeedForward(nn.Module):
    """The dense baseline: `act(x W_up) W_down` (the paper: ReLU, no biases), or gated (`gated_mlp`, Llama's
    SwiGLU with silu): `(act(x W_gate) * (x W_up)) W_down`."""

    def __init__(self, config: MoTConfig):
        super().__init__()
        size, width, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        # CODEPATH: ungated: the paper's presets (ReLU); gated: the modern presets (SwiGLU).
        self.gate_proj = nn.Linear(size, width, bias=bias) if config.gated_mlp else None
        self.up_proj = nn.Linear(size, width, bias=bias)
        self.down_proj = nn.Linear(width, size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor, **routing_kwargs) -> torch.Tensor:
        """`[B, S, d] -> [B, S, d]`; the routed layers' arguments (`token_mask`, `output_routing_stats`) do not apply."""
        if self.gate_proj is None:
            hidden = feed_forward_activation(self.up_proj(hidden_states), self.act_fn)
        else:
            hidden = feed_forward_activation(self.gate_proj(hidden_states), self.act_fn, self.up_proj(hidden_states))
        return self.down_proj(hidden)


class MoTRouter(nn.Module):
    """MoT's and Expert Choice's controller: one score per expert for every token, `x W^T` with `weight [E, d]`. Its
    logits are recorded as `controller_logits` (not `router_logits`: they are normalised over a group, not over
    experts)."""

    def __init__(self, config: MoTConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.weight)  # [..., d] -> [..., E]


class TopKRouter(nn.Module):
    """Token Choice's router (Switch): logits `x W^T` (`weight [E, d]`, MoT's controller after transition tuning),
    softmax over experts in fp32, top-k; the gates are the top-k probabilities, not renormalised (Qwen2-MoE's router
    with `norm_topk_prob=False`). Its logits are the model's `router_logits`."""

    def __init__(self, config: MoTConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor):
        """`[N, d]` -> router logits `[N, E]`, gates (fp32) and expert indices `[N, k]`."""
        router_logits = F.linear(hidden_states, self.weight)
        top_k_weights, top_k_index = torch.softmax(router_logits.float(), dim=-1).topk(self.top_k, dim=-1)
        return router_logits, top_k_weights, top_k_index


def project(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            product_kernels=None) -> torch.Tensor:
    """`[E, N, in] @ [E, in, out] (+ [E, out])` -> `[E, N, out]`, or one expert's `[N, in] @ [in, out] (+ [out])`.
    bmm reads each matrix of a transposed view as it lies; matmul would copy such a view first. `product_kernels`:
    `MoTExperts.product_kernels`, asked first for the products without a bias."""
    if inputs.dim() == 3:
        if bias is None and product_kernels is not None:
            output = expert_product(inputs, weight, product_kernels)
            if output is not None:
                return output
        return torch.bmm(inputs, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), inputs, weight)
    return inputs @ weight if bias is None else torch.addmm(bias, inputs, weight)


def expert_feed_forward(inputs, up_proj, up_proj_bias, down_proj, down_proj_bias, act_fn, gated: bool,
                        product_kernels=None):
    """What an expert computes, for all experts at once (`[E, N, d]` inputs, `[E, in, out]` weights) or for one
    (`[N, d]`, `[in, out]`): the dense layer's maths, with `W_gate` and `W_up` the two halves of the fused
    `gate_up_proj` when gated."""
    hidden = project(inputs, up_proj, up_proj_bias, product_kernels)
    if gated:
        gate, up = hidden.chunk(2, dim=-1)
        hidden = feed_forward_activation(gate, act_fn, up)
    else:
        hidden = feed_forward_activation(hidden, act_fn)
    return project(hidden, down_proj, down_proj_bias, product_kernels)


class MoTExperts(nn.Module):
    """`E` feed-forward experts with stacked weights, under transformers' MoE names in its transposed layout:
    `gate_up_proj [E, d, 2f]` (gate columns first; with `gated_mlp`) or `up_proj [E, d, f]`, and `down_proj [E, f, d]`,
    with `*_bias [E, out]` under `mlp_bias`. Expert `e` computes what the dense feed-forward layer computes, with its
    own weights.

    Called in one of two ways, both through `__call__` so that whatever wraps the module applies (PEFT's adapters on
    `up_proj`/`down_proj`, forward hooks, FSDP's unsharding), and dispatched by `ExpertRowsOrTokens`:
    - `experts(expert_inputs)`: one block of rows per expert, `[E, N, d] -> [E, N, d]` (`process`: MoT's mixed
      tokens, Expert Choice's picks, Token Choice's capacity slots);
    - `experts(hidden_states, top_k_index, top_k_weights)`: transformers' token-routed interface (Token Choice),
      run by the function `config._experts_implementation` names (eager: `forward` below; batched_mm, grouped_mm
      or any function registered in `ALL_EXPERTS_FUNCTIONS`).

    The classes below are this one with transformers' flags for one weight layout each (`make_experts`).
    """

    # Compiled batched products: a function of an `[E, N, in]` input and an `[E, in, out]` weight that returns
    # kernels for them or None (`ExpertProductsWithKernels`). The `mixture_of_tokens` package installs its CPU
    # kernels here (cpu_kernels.py); this file loaded on its own, as Hub code, has none and runs bmm.
    product_kernels: Callable[[torch.Tensor, torch.Tensor], object | None] | None = None

    def __init__(self, config: MoTConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.expert_size
        experts, size, width, bias = config.num_experts, config.hidden_size, config.expert_size, config.mlp_bias
        # CODEPATH: `up_proj`: the paper's presets (ReLU experts); `gate_up_proj`: the modern presets (SwiGLU).
        if config.gated_mlp:
            self.gate_up_proj = nn.Parameter(torch.empty(experts, size, 2 * width))
            self.gate_up_proj_bias = nn.Parameter(torch.empty(experts, 2 * width)) if bias else None
        else:
            self.up_proj = nn.Parameter(torch.empty(experts, size, width))
            self.up_proj_bias = nn.Parameter(torch.empty(experts, width)) if bias else None
        self.down_proj = nn.Parameter(torch.empty(experts, width, size))
        self.down_proj_bias = nn.Parameter(torch.empty(experts, size)) if bias else None
        self.act_fn = ACT2FN[config.hidden_act]

    def process(self, expert_inputs: torch.Tensor) -> torch.Tensor:
        """`[E, N, d]` -> `[E, N, d]`: expert `e` processes row block `e`."""
        # No compiled kernels while Dynamo traces: they are opaque to it.
        product_kernels = None if torch.compiler.is_compiling() else self.product_kernels
        return expert_feed_forward(expert_inputs, *self.up_projection(), self.down_proj, self.down_proj_bias,
                                   self.act_fn, self.has_gate, product_kernels)

    def process_one(self, expert: int, inputs: torch.Tensor) -> torch.Tensor:
        """`[N, d]` -> `[N, d]` through expert `expert` alone."""
        up_proj, up_proj_bias = self.up_projection()
        return expert_feed_forward(
            inputs, up_proj[expert], None if up_proj_bias is None else up_proj_bias[expert], self.down_proj[expert],
            None if self.down_proj_bias is None else self.down_proj_bias[expert], self.act_fn, self.has_gate,
        )

    def up_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first projection's weight and bias: `gate_up_proj` when gated, else `up_proj`."""
        if self.has_gate:
            return self.gate_up_proj, self.gate_up_proj_bias
        return self.up_proj, self.up_proj_bias

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """Eager: `[N, d]` tokens, `[N, k]` chosen experts and gates -> `[N, d]`, each used expert once on its tokens.
        Reads the experts' token counts back to the host once (batched_mm and grouped_mm do not)."""
        num_tokens, top_k = top_k_index.shape
        flat = top_k_index.reshape(-1)  # [N*k], assignment a = token a // k
        weights = top_k_weights.reshape(-1, 1).to(hidden_states.dtype)
        if 0 < flat.numel() <= self.num_experts:
            # Few assignments (decoding): one small product each costs less than sorting them by expert.
            rows = [self.process_one(expert, hidden_states[a // top_k : a // top_k + 1])
                    for a, expert in enumerate(flat.tolist())]
            return (torch.cat(rows) * weights).view(num_tokens, top_k, -1).sum(1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        output = torch.zeros_like(hidden_states)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                chosen = order[start : start + count]
                token = chosen // top_k
                gate = weights[chosen]
                # index_put_(accumulate=True), not index_add_: the latter is much slower on CPU (torch 2.13).
                output.index_put_((token,), self.process_one(expert, hidden_states[token]) * gate, accumulate=True)
                start += count
        return output


class ExpertRowsOrTokens:
    """The experts interface that `@use_experts_implementation` dispatches `MoTExperts`' calls through: a call with
    the expert inputs alone runs `process`; a token-routed call runs the function that `config._experts_implementation`
    names in transformers' `ALL_EXPERTS_FUNCTIONS` (whose registrations it reads, so a user's own function works)."""

    def get_interface(self, experts_implementation: str, default: Callable) -> Callable:
        def experts_forward(experts, hidden_states, top_k_index=None, top_k_weights=None):
            if top_k_index is None:  # needs no implementation: a layer used on its own has none set
                return experts.process(hidden_states)
            token_routed = ALL_EXPERTS_FUNCTIONS.get_interface(experts_implementation, default)
            return token_routed(experts, hidden_states, top_k_index, top_k_weights)

        return experts_forward


EXPERT_ROWS_OR_TOKENS = ExpertRowsOrTokens()


# One class per weight layout: `@use_experts_implementation` states a class's layout, and ours follows the config
# (gated or not, biases or not). Weights are stored `[E, in, out]` (transformers' `is_transposed` layout, as
# GPT-OSS's): the batched matmuls of MoT then read them as they are; through a transposed view, CPU bf16 bmm ran at
# half the speed (forward + backward).
@use_experts_implementation(is_transposed=True, has_gate=False, experts_interface=EXPERT_ROWS_OR_TOKENS)
class MoTUngatedExperts(MoTExperts):
    """Experts with `up_proj` and no gate (the paper's: ReLU, no biases)."""


@use_experts_implementation(is_transposed=True, has_gate=True, experts_interface=EXPERT_ROWS_OR_TOKENS)
class MoTGatedExperts(MoTExperts):
    """Experts with a fused `gate_up_proj` (the modern presets: SwiGLU)."""


@use_experts_implementation(is_transposed=True, has_gate=False, has_bias=True, experts_interface=EXPERT_ROWS_OR_TOKENS)
class MoTUngatedExpertsWithBias(MoTExperts):
    """`MoTUngatedExperts` with biases (`mlp_bias`)."""


@use_experts_implementation(is_transposed=True, has_gate=True, has_bias=True, experts_interface=EXPERT_ROWS_OR_TOKENS)
class MoTGatedExpertsWithBias(MoTExperts):
    """`MoTGatedExperts` with biases (`mlp_bias`)."""


def make_experts(config: MoTConfig) -> MoTExperts:
    """The experts module of a routed layer, of the class for the config's weight layout."""
    # CODEPATH: (gated_mlp, mlp_bias): the paper's presets (False, False), the modern ones (True, False).
    experts_class = {
        (False, False): MoTUngatedExperts,
        (True, False): MoTGatedExperts,
        (False, True): MoTUngatedExpertsWithBias,
        (True, True): MoTGatedExpertsWithBias,
    }[config.gated_mlp, config.mlp_bias]
    return experts_class(config)


class RoutingStatistics(nn.Module):
    """Hands a routed layer's statistics (a dict of tensors) on unchanged, so that transformers' output capturing
    records them as `routing_stats` (`output_routing_stats=True`) and the training telemetry can hook them."""

    def forward(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return stats


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
    if (batch_size < group_size or missing) and not torch.compiler.is_compiling():
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


MIN_LOG_TEMPERATURE = math.log(1e-4)


def _one_hot(index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`F.one_hot` without its range check, which reads the indices back to the host."""
    return (index.unsqueeze(-1) == torch.arange(num_classes, device=index.device)).long()


def _entropy(probs: torch.Tensor, dim: int) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-20).log()).sum(dim)


class MixtureOfTokens(nn.Module):
    """The MoT layer (docs/design.md; the paper's section 3).

    For each group (contiguous block of `G` rows) and position: logits `x W_c`, weights = softmax over the
    group's tokens (separately per expert) of `logits / T`; expert `e` gets `sum_g w[g, e] x[g]`, and token `g`
    receives `sum_e w[g, e] expert_e(...)`.
    """

    # The layout of the merged and processed tokens between merge, experts and emit (`merge_process_emit`): None
    # takes the one the batched matmuls read best for the tokens' device and dtype; True (expert-major copies) or
    # False (transposed views) forces one, for benchmarks and tests. Either computes the same.
    expert_major_layout: bool | None = None
    # Compiled merge and emit kernels: a function of the weights and tokens that returns kernels for them or None
    # (`MergeWithKernels`). The `mixture_of_tokens` package installs its CPU kernels here (cpu_kernels.py); this file
    # loaded on its own, as Hub code, has none and runs the batched matmuls, which compute the same.
    mixing_kernels: Callable[[torch.Tensor, torch.Tensor], object | None] | None = None

    def __init__(self, config: MoTConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.group_size = config.group_size
        self.routing = config.mot_routing
        self.gate = MoTRouter(config)
        self.experts = make_experts(config)
        self.routing_stats = RoutingStatistics()
        # CODEPATH: "off": every preset (the paper's fixed T = 1); "shared" / "per_expert": the paper's learned-temperature
        # ablation, trained with `mot train --learnable_temperature`.
        if config.learnable_temperature == "off":
            self.log_temperature = None
        else:
            # T = exp(p) keeps the learned temperature positive whatever the optimizer does.
            # CODEPATH: one temperature per layer ("shared") or per expert ("per_expert"), as above.
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
            logits = self.gate(grouped)
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

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None,
                output_routing_stats: bool = False) -> torch.Tensor:
        """`[B, S, d] -> [B, S, d]`; `token_mask` `[B, S]` marks the real tokens (padding takes no part in a group)."""
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
        # Steps 1-2: controller logits, softmax over the group's tokens for each expert.
        weights = self.mixing_weights(tokens, group_mask)  # [p, G, E], softmax over G; fp32 under autocast
        mixing = weights.to(tokens.dtype)
        # CODEPATH: no checkpoint differs: a training-time memory option (`mot train --mot_recompute`), same outputs.
        if self.config.mot_recompute and self.training and torch.is_grad_enabled():
            # The merged and processed tokens are E/G times the input each: recompute them in backward instead.
            output = checkpoint(self.merge_process_emit, mixing, tokens, use_reentrant=False)
        else:
            output = self.merge_process_emit(mixing, tokens)  # [p, G, d]
        # [p, G, d] = [n, S, G, d] -> [n, G, S, d] -> [B, S, d]
        output = ContiguousTranspose.apply(output.view(num_groups, seq_len, group_size, hidden_size), 1, 2)
        if output_routing_stats:
            self.routing_stats(self.mixing_stats(weights))
        return drop_group_padding(output.view(-1, seq_len, hidden_size), batch_size)

    def merge_process_emit(self, mixing: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Steps 3-5 for weights `[p, G, E]` and tokens `[p, G, d]` -> `[p, G, d]`.

        The merge and emit are batched over positions, the experts over experts: the merged and processed tokens
        (E/G times the input each) change between position-major and expert-major layout. Where the batched matmuls
        read strided operands in place, that change is a transposed view; where they would copy them (CPU bf16), it
        is made explicitly, once per tensor and into the layout each product reads.
        """
        expert_major = self.expert_major_layout
        if expert_major is None:
            kernels = self.compiled_mixing_kernels(mixing, tokens)
            if kernels is not None:  # the same three steps, with merge and emit reading the experts' layout in place
                merged = MergeWithKernels.apply(mixing, tokens, kernels)  # [E, p, d]
                return EmitWithKernels.apply(mixing, self.experts(merged), kernels)  # [p, G, d]
            expert_major = batched_matmul_copies_views(tokens)
        if expert_major:  # the same three steps as below, with the layout changes made inside merge and emit
            merged = MergeExpertMajor.apply(mixing, tokens)  # [E, p, d], contiguous
            return EmitExpertMajor.apply(mixing, self.experts(merged))  # [p, G, d]
        # Step 3, merge: one mixed token per expert, m_e = sum_g w[g, e] x[g].
        merged = torch.bmm(mixing.transpose(1, 2), tokens)  # [p, E, G] @ [p, G, d] -> [p, E, d]
        # Step 4, process: expert e on its mixed token of every (group, position).
        processed = self.experts(merged.transpose(0, 1))  # [E, p, d]
        # Step 5, emit with the same weights: y[g] = sum_e w[g, e] h_e.
        return torch.bmm(mixing, processed.transpose(0, 1))  # [p, G, E] @ [p, E, d] -> [p, G, d]

    def compiled_mixing_kernels(self, mixing: torch.Tensor, tokens: torch.Tensor) -> object | None:
        """`mixing_kernels` for these weights and tokens, if any; none while Dynamo traces (the kernels are opaque
        to it)."""
        if self.mixing_kernels is None or torch.compiler.is_compiling():
            return None
        return self.mixing_kernels(mixing, tokens)

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


def expert_assignment_fraction(top_k_index: torch.Tensor, num_experts: int, token_weight: torch.Tensor) -> torch.Tensor:
    """The fraction of the real tokens' assignments `[N, k]` that goes to each expert, `[E]`."""
    assignments = (_one_hot(top_k_index, num_experts).sum(1) * token_weight).sum(0)
    return assignments / assignments.sum().clamp_min(1)


def router_losses(router_logits: torch.Tensor, top_k: int, token_weight: torch.Tensor | None = None):
    """One Token Choice layer's load-balancing loss and router z-loss over its real tokens (docs/design.md):
    `E * sum_e (mean router probability of e) * (fraction of assignments to e)` and the mean squared logsumexp of the
    logits. Router logits `[N, E]` (the router's choice is the top-k of their softmax), `token_weight` `[N, 1]` (1 for
    a real token, 0 for padding; None: all real)."""
    num_experts = router_logits.shape[-1]
    weight = torch.ones_like(router_logits[:, :1], dtype=torch.float32) if token_weight is None else token_weight
    num_real = weight.sum().clamp_min(1)
    router_probs = torch.softmax(router_logits.float(), dim=-1)
    top_k_index = router_probs.topk(top_k, dim=-1).indices
    assignment_fraction = expert_assignment_fraction(top_k_index, num_experts, weight)
    mean_probs = (router_probs * weight).sum(0) / num_real
    balance_loss = num_experts * (mean_probs * assignment_fraction).sum()
    z_loss = (torch.logsumexp(router_logits.float(), dim=-1, keepdim=True).square() * weight).sum() / num_real
    return balance_loss, z_loss


class TokenChoice(nn.Module):
    """Token Choice (Switch) routing: softmax over experts per token, top-k, output scaled by the router
    probability. While training each expert takes at most `capacity_factor * tokens * k / E` tokens (the rest
    are dropped); in eval mode it is dropless, through transformers' experts interface, so a sequence's output
    never depends on the rest of the batch.
    """

    def __init__(self, config: MoTConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.capacity_factor = config.capacity_factor
        self.gate = TopKRouter(config)
        self.experts = make_experts(config)
        self.routing_stats = RoutingStatistics()

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None,
                output_routing_stats: bool = False) -> torch.Tensor:
        """`[B, S, d] -> [B, S, d]`; `token_mask` `[B, S]` marks the real tokens. The router losses are computed from
        the recorded router logits, in `MoTForCausalLM` (`router_losses`)."""
        batch_size, seq_len, hidden_size = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden_size)  # [N, d]
        router_logits, top_k_weights, top_k_index = self.gate(tokens)
        valid = None if token_mask is None else token_mask.reshape(-1, 1)  # [N, 1]
        dropped = None
        if self.training:
            # Padding takes no capacity and gets a zero update.
            output, dropped = self._dispatch_with_capacity(tokens, top_k_index, top_k_weights, valid)
        else:
            # Each token on its own: padding is routed like any token, and its output is never read.
            output = self.experts(tokens, top_k_index, top_k_weights.to(tokens.dtype))

        if output_routing_stats:
            self.routing_stats(self.routing_statistics(router_logits, top_k_index, valid, dropped))
        return output.view(batch_size, seq_len, hidden_size)

    @torch.no_grad()
    def routing_statistics(self, router_logits, top_k_index, valid, dropped) -> dict[str, torch.Tensor]:
        """Router losses, expert load, router entropy and the dropped fraction of the real tokens' assignments."""
        weight = torch.ones_like(router_logits[:, :1], dtype=torch.float32) if valid is None else valid.float()
        balance_loss, z_loss = router_losses(router_logits, self.top_k, weight)
        router_probs = torch.softmax(router_logits.float(), dim=-1)
        assignment_fraction = expert_assignment_fraction(top_k_index, self.num_experts, weight)
        return {
            "aux_loss": self.config.router_aux_loss_coef * balance_loss + self.config.router_z_loss_coef * z_loss,
            "balance_loss": balance_loss,
            "z_loss": z_loss,
            "expert_load_max": assignment_fraction.max() * self.num_experts,  # 1 = perfectly balanced
            "router_entropy": (_entropy(router_probs, dim=-1).unsqueeze(-1) * weight).sum() / weight.sum().clamp_min(1),
            "dropped_fraction": torch.zeros(()) if dropped is None else dropped,
            "expert_load": assignment_fraction,
        }

    def _dispatch_with_capacity(self, tokens, top_k_index, top_k_weights, valid):
        """Static-shape training path: scatter into `[E, capacity, d]`, one batched matmul, gather back. Its one host
        synchronisation is the capacity, which counts the real tokens when there is padding."""
        num_tokens, hidden_size = tokens.shape
        num_real = num_tokens if valid is None else int(valid.sum())
        capacity = max(1, math.ceil(self.capacity_factor * num_real * self.top_k / self.num_experts))
        # Assignments in priority order: every token's first choice before any second choice (Switch/GShard).
        expert = top_k_index.t().reshape(-1)  # [A = k * N]
        gate = top_k_weights.t().reshape(-1)
        one_hot = _one_hot(expert, self.num_experts)  # [A, E]
        if valid is not None:
            one_hot = one_hot * valid.reshape(1, -1).expand(self.top_k, -1).reshape(-1, 1)
        position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # place in its expert's queue; -1 for padding
        fits = (position >= 0) & (position < capacity)  # padding never fits: no capacity, a zero update
        # Assignments that do not fit go to one spare row past the experts' slots, which is never processed.
        spare = self.num_experts * capacity
        slot = torch.where(fits, expert * capacity + position, spare)
        token = torch.arange(num_tokens, device=tokens.device).repeat(self.top_k)
        expert_inputs = tokens.new_zeros(spare + 1, hidden_size).index_put((slot,), tokens[token])
        processed = self.experts(expert_inputs[:spare].view(self.num_experts, capacity, hidden_size))
        processed = F.pad(processed.reshape(spare, hidden_size), (0, 0, 0, 1))  # the spare row reads zeros
        weighted = processed[slot] * (gate * fits).unsqueeze(-1).to(tokens.dtype)  # [A, d]
        output = weighted.view(self.top_k, num_tokens, hidden_size).sum(0)
        dropped = 1.0 - fits.sum() / one_hot.sum().clamp_min(1)  # of the real tokens' assignments
        return output, dropped


class ExpertChoice(nn.Module):
    """Expert Choice: within the same cross-example groups as MoT (`G` rows at one position), each expert picks
    its `k * G / E` highest-scoring tokens (scores: softmax over experts per token) and scales its output by
    the score. Groups at one position keep the layer causal."""

    def __init__(self, config: MoTConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.group_size = config.group_size
        self.tokens_per_expert = max(1, min(config.group_size,
                                            round(config.num_experts_per_tok * config.group_size / config.num_experts)))
        self.gate = MoTRouter(config)
        self.experts = make_experts(config)
        self.routing_stats = RoutingStatistics()

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None,
                output_routing_stats: bool = False) -> torch.Tensor:
        """`[B, S, d] -> [B, S, d]`; `token_mask` `[B, S]` marks the real tokens."""
        batch_size, seq_len, hidden_size = hidden_states.shape
        grouped, group_mask = group_rows(hidden_states, token_mask, self.group_size)  # [n, G, S, d]
        num_groups, group_size = grouped.shape[:2]
        capacity = min(self.tokens_per_expert, group_size)
        scores = torch.softmax(self.gate(grouped).float(), dim=-1)  # [n, G, S, E]
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
        expert_outputs = self.experts(expert_inputs)
        expert_outputs = expert_outputs.view(self.num_experts, num_groups, seq_len, capacity, hidden_size)
        expert_outputs = expert_outputs.permute(1, 2, 0, 3, 4) * choice_score.unsqueeze(-1).to(grouped.dtype)
        output = torch.zeros_like(by_position).scatter_add_(
            2, flat_choice.expand(-1, -1, -1, hidden_size),
            expert_outputs.reshape(num_groups, seq_len, -1, hidden_size),
        )  # [n, S, G, d]
        if output_routing_stats:
            with torch.no_grad():
                load = torch.zeros(num_groups, seq_len, group_size, device=scores.device)
                load.scatter_add_(2, choice.reshape(num_groups, seq_len, -1), torch.ones_like(choice_score).flatten(2))
                self.routing_stats({"unprocessed_fraction": (load == 0).float().mean()})
        return drop_group_padding(output.transpose(1, 2).reshape(-1, seq_len, hidden_size), batch_size)


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
        self.input_layernorm = make_norm(config)
        self.self_attn = MoTAttention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = FEED_FORWARD_CLASSES[self.mlp_type](config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_routing_stats: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        attn_output, _ = self.self_attn(self.input_layernorm(hidden_states), attention_mask, cache=cache, **kwargs)
        hidden_states = hidden_states + attn_output
        mlp_output = self.mlp(self.post_attention_layernorm(hidden_states), token_mask=token_mask,
                              output_routing_stats=output_routing_stats)
        return hidden_states + mlp_output


@auto_docstring(custom_intro="The weights' initialisation and transformers' plumbing of the Mixture of Tokens models.")
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
    # Recorded by transformers' output capturing when `output_<name>=True` (argument or config).
    _can_record_outputs = {
        "hidden_states": MoTBlock,
        "attentions": OutputRecorder(MoTAttention, index=1),
        # transformers' convention: per-token `[tokens, E]` logits of the token-routed layers (Token Choice), which
        # trainers read for Mixtral's load-balancing loss; MoT's and Expert Choice's controllers apart.
        "router_logits": OutputRecorder(TopKRouter, index=0),
        "controller_logits": MoTRouter,
        "routing_stats": RoutingStatistics,
    }

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
        # CODEPATH: "unit_fan_in": models trained to match the authors' code (`mot train --embedding_init`); every
        # preset takes "fan_in_hidden".
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
        elif isinstance(module, (MoTRouter, TopKRouter)):
            truncated(module.weight, self.config.hidden_size)
        elif isinstance(module, MoTExperts):
            truncated(module.gate_up_proj if module.has_gate else module.up_proj, self.config.hidden_size)
            truncated(module.down_proj, self.config.expert_size)
            for name in ("gate_up_proj_bias", "up_proj_bias", "down_proj_bias"):
                if getattr(module, name, None) is not None:
                    init.zeros_(getattr(module, name))
        elif isinstance(module, MixtureOfTokens) and module.log_temperature is not None:
            init.constant_(module.log_temperature, math.log(self.config.mot_temperature))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' `from_pretrained`; a checkpoint written with the earlier parameter names is converted to
        today's on the way in (legacy_mot.py; the same logits, up to float rounding)."""
        legacy = None
        if kwargs.get("state_dict") is None and pretrained_model_name_or_path is not None:
            legacy = read_legacy_checkpoint(cls, pretrained_model_name_or_path, kwargs)
        if legacy is None:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        # transformers takes converted tensors only without a path: the config and generation config come from it.
        kwargs["state_dict"], kwargs["config"], hub = legacy
        model = super().from_pretrained(None, *model_args, **kwargs)
        try:
            model.generation_config = GenerationConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        except OSError:
            pass  # no generation_config.json: the one built from the model's config stays
        return model


def new_token_padding(attention_mask, padding_mask: torch.Tensor | None, cache: Cache | None,
                      seq_len: int) -> torch.Tensor | None:
    """Which of the `seq_len` new tokens are real, `[B, S]` bool, for MoT's and Expert Choice's groups: from
    `padding_mask` (what `generate()` passes beside a 4-D mask), a 2-D attention mask, or the diagonal of a 4-D one
    over the keys of these tokens (a token attends to itself unless it is padding). None: nothing is padded."""
    mask = padding_mask if padding_mask is not None else attention_mask
    if not isinstance(mask, torch.Tensor):
        return None  # no mask, or flex attention's BlockMask without a `padding_mask`
    if mask.dim() == 2:
        return mask[:, -seq_len:].bool()
    if cache is not None and not isinstance(cache, DynamicCache):
        return None  # keys at cache slots (static: generate() passes `padding_mask`) or packed requests (paged)
    # [B, 1 or heads, S, keys]: the new tokens are the last S keys. Boolean masks allow with True, additive ones with 0.
    diagonal = torch.diagonal(mask[:, 0, :, -seq_len:], dim1=-2, dim2=-1)  # [B, S]
    return diagonal if diagonal.dtype == torch.bool else diagonal == 0


def refuse_packed_rows(position_ids: torch.Tensor | None, kwargs: dict, grouped_types: list[str]) -> None:
    """Padding-free packing (several sequences in one row: `cu_seq_lens_*`, or positions that restart inside a row)
    leaves MoT and Expert Choice a batch of one row, so each group holds one sequence and a MoT layer silently
    becomes a dense layer of width E * f. One clear error instead."""
    packed = kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None
    if not packed and position_ids is not None and position_ids.shape[-1] > 1 and not torch.compiler.is_compiling():
        packed = bool((position_ids.diff(dim=-1) < 0).any())  # one host sync per training step
    if packed:
        raise ValueError(
            f"this batch packs several sequences into one row (padding-free packing), but {' and '.join(grouped_types)}"
            " layers group the rows of a batch at each position: train with packing=False, or with a packing that keeps"
            " whole rows (TRL: packing_strategy=\"wrapped\")"
        )


def no_empty_router_outputs(forward: Callable) -> Callable:
    """transformers' output capturing gives an empty tuple for a requested output that no module records. A model
    without token-routed layers has no router logits, which transformers' MoE code (Mixtral's load-balancing loss,
    as TRL computes it) reads as None; the same for a model without controllers."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        outputs = forward(self, *args, **kwargs)
        if isinstance(outputs, MoTModelOutputWithPast):
            for name in ("router_logits", "controller_logits"):
                if outputs.get(name) == ():
                    outputs[name] = None
        return outputs

    return wrapper


@auto_docstring(
    custom_intro="""The Mixture of Tokens decoder: token embeddings, learned absolute position embeddings (the paper)
    or rotary ones in every attention layer, `num_hidden_layers` blocks, final norm."""
)
class MoTModel(MoTPreTrainedModel):

    def __init__(self, config: MoTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        learned = config.position_embedding_type == "learned"
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size) if learned else None
        self.rotary_emb = None if learned else MoTRotaryEmbedding(config)
        self.layers = nn.ModuleList(MoTBlock(config, i) for i in range(config.num_hidden_layers))
        # CODEPATH: every preset has a final norm; the authors' code has none (final_norm=False, for comparisons with
        # it). An Identity keeps the forward one path.
        self.norm = make_norm(config) if config.final_norm else nn.Identity()
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @no_empty_router_outputs
    @merge_with_config_defaults
    @capture_outputs
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        padding_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> MoTModelOutputWithPast:
        r"""
        cache (`Cache`, *optional*):
            The KV cache of earlier tokens; `past_key_values` is its name before transformers 5.24.
        padding_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 for real tokens (or `[B, cached + S]`): which tokens MoT and Expert Choice leave out of their groups
            when `attention_mask` is not 2-D. `generate()` passes it with a static cache.
        past_key_values (`Cache`, *optional*):
            The KV cache under its name before transformers 5.24.

        Besides transformers' `output_*` flags, `output_routing_stats` returns per-routed-block routing statistics,
        `output_router_logits` the `[tokens, E]` router logits of the Token Choice blocks (transformers' convention;
        None for a model without any) and `output_controller_logits` MoT's and Expert Choice's controller logits, one
        tensor per block, E last, in their group layout: `[positions * groups, G, E]` and `[groups, G, S, E]`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        # CODEPATH: MoT and Expert Choice models (tiny-mot, mot-medium-32e*, ...); dense and Token Choice ones need no check.
        if self.training and self.config.grouped_layer_types:
            refuse_packed_rows(position_ids, kwargs, self.config.grouped_layer_types)
        cache = merge_cache_arguments(cache, past_key_values)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        seq_len = inputs_embeds.shape[1]
        token_mask = new_token_padding(attention_mask, padding_mask, cache, seq_len)
        if position_ids is None:
            position_ids = self.position_ids(attention_mask, cache, seq_len, inputs_embeds.device)

        # The cache goes positionally: its keyword is `cache` from transformers 5.24 and `past_key_values` before.
        causal_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids=position_ids)
        if self.embed_positions is not None:
            hidden_states, position_embeddings = inputs_embeds + self.embed_positions(position_ids), None
        else:
            hidden_states, position_embeddings = inputs_embeds, self.rotary_emb(inputs_embeds, position_ids)
        # Routing statistics cost little next to a backward pass: computed while training (the telemetry reads
        # them) and on request.
        requested = kwargs.pop("output_routing_stats", None)
        output_routing_stats = self.training or bool(
            self.config.output_routing_stats if requested is None else requested
        )
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=causal_mask, token_mask=token_mask, cache=cache,
                                  output_routing_stats=output_routing_stats, position_embeddings=position_embeddings,
                                  **kwargs)
        return MoTModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states), **{CACHE_NAME: cache if use_cache else None}
        )

    def position_ids(self, attention_mask, cache: Cache | None, seq_len: int, device) -> torch.Tensor:
        """Positions of the new tokens: after the cached ones, counting real tokens only under a 2-D mask with
        left padding (the same rule as `generate()`)."""
        if attention_mask is not None and attention_mask.dim() == 2:
            return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -seq_len:]
        past_length = cache.get_seq_length() if cache is not None else 0
        if self.embed_positions is not None and isinstance(past_length, int):
            if past_length + seq_len > self.config.max_position_embeddings:
                raise ValueError(
                    f"sequence length {past_length + seq_len} (cached {past_length} + new {seq_len}) exceeds "
                    f"max_position_embeddings={self.config.max_position_embeddings} of this model"
                )
        return torch.arange(seq_len, device=device).unsqueeze(0) + past_length


@auto_docstring(custom_intro="The Mixture of Tokens decoder with a language-modelling head.")
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

    def prepare_inputs_for_generation(self, input_ids, *args, attention_mask=None, inputs_embeds=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, attention_mask=attention_mask,
                                                       inputs_embeds=inputs_embeds, **kwargs)
        # A compilable (static) cache turns the 2-D mask into a 4-D one, in which the new tokens' keys sit at cache
        # slots; MoT's and Expert Choice's groups still need to know which new tokens are padding.
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and inputs.get(
            "attention_mask"
        ) is not attention_mask:
            new = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
            inputs["padding_mask"] = attention_mask[:, -new.shape[1]:]
        return inputs

    def init_continuous_batching(self, *args, **kwargs):
        """transformers' continuous batching (`generate_batch`, `transformers serve`), for dense and Token Choice
        models. It packs requests at different positions into one sequence, which MoT and Expert Choice cannot group
        (their groups are rows at one position): those are refused here, before any request runs."""
        grouped = self.config.grouped_layer_types
        if grouped:
            raise ValueError(f"continuous batching cannot run {' and '.join(grouped)} layers (their groups are batch "
                             "rows at one position; it packs requests into one sequence): use generate(), or "
                             "`mot transition` the model to Token Choice")
        return super().init_continuous_batching(*args, **kwargs)

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> MoTCausalLMOutputWithPast:
        r"""
        cache (`Cache`, *optional*):
            The KV cache of earlier tokens; `past_key_values` is its name before transformers 5.24.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Token ids for the language-modelling loss (shifted inside; -100 is ignored).
        past_key_values (`Cache`, *optional*):
            The KV cache under its name before transformers 5.24.

        `output_routing_stats`, `output_router_logits`, `output_controller_logits` and `padding_mask`: see
        `MoTModel.forward`.

        While training with `labels` and `config.chunked_lm_loss` (the default), the loss is computed without
        materialising the logits and `logits` is None (see `ChunkedLMLoss`).

        While training, the Token Choice router losses (`aux_loss`) are added to `loss`. Under gradient
        accumulation (Trainer passes `num_items_in_batch`), they are weighted by this micro-batch's share of the
        label tokens, like the language-modelling loss, so accumulation never over-counts them.
        """
        token_routed = self.training and "token_choice" in self.config.mlp_types
        if token_routed:
            kwargs["output_router_logits"] = True  # the router losses are computed from them, below
        outputs: MoTModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=merge_cache_arguments(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
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
        aux_loss = None
        if token_routed:
            token_mask = new_token_padding(attention_mask, kwargs.get("padding_mask"), outputs.get(CACHE_NAME),
                                           outputs.last_hidden_state.shape[1])
            aux_loss = self.router_loss(outputs.router_logits, token_mask)
        if loss is not None and aux_loss is not None:
            share = 1.0
            num_items_in_batch = kwargs.get("num_items_in_batch")
            if num_items_in_batch is not None:
                local_items = (labels[..., 1:] != -100).sum()
                share = local_items / torch.as_tensor(num_items_in_batch, device=labels.device)
            loss = loss + aux_loss.to(loss.device) * share

        return MoTCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            **{CACHE_NAME: outputs.get(CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            controller_logits=outputs.controller_logits,
            routing_stats=outputs.routing_stats,
        )

    def router_loss(self, router_logits: tuple[torch.Tensor, ...], token_mask: torch.Tensor | None) -> torch.Tensor:
        """The Token Choice layers' router losses (`router_aux_loss_coef` * load balancing + `router_z_loss_coef` *
        z-loss, over the real tokens of `token_mask` `[B, S]`), averaged over the layers so that the coefficients mean
        the same at any depth."""
        token_weight = None if token_mask is None else token_mask.reshape(-1, 1).float()
        losses = []
        for logits in router_logits:
            balance_loss, z_loss = router_losses(logits, self.config.num_experts_per_tok, token_weight)
            losses.append(self.config.router_aux_loss_coef * balance_loss + self.config.router_z_loss_coef * z_loss)
        return torch.stack(losses).mean()


__all__ = [
    "MoTPreTrainedModel",
    "MoTModel",
    "MoTForCausalLM",
    "MixtureOfTokens",
    "TokenChoice",
    "ExpertChoice",
    "DenseFeedForward",
    "MoTExperts",
    "MoTRouter",
]
