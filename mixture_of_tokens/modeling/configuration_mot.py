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
"""Configuration of Mixture of Tokens (MoT) causal language models.

Mixture of Tokens (Antoniak et al., arXiv 2310.15961) is a continuous mixture of experts: tokens at the same
position of `group_size` different sequences are mixed into one token per expert, processed, and redistributed
with the same weights. This file is self-contained (it travels to the Hub as custom code next to
`modeling_mot.py`), so it imports only `transformers` and `huggingface_hub` (a dependency of transformers).
"""

# Annotations stay strings: `@strict` then leaves our fields' types to `validate_mot()`, whose `ValueError` names the
# field in one line, instead of raising its own multi-line error (and rejecting an int for a float field).
from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils import auto_docstring

MLP_TYPES = ("dense", "mot", "token_choice", "expert_choice")
ROUTED_TYPES = ("mot", "token_choice", "expert_choice")  # a router and experts
# Layers that group the rows of a batch at one position: their output for a sequence depends on the others.
GROUPED_TYPES = ("mot", "expert_choice")
SWITCH_AUX_LOSS_COEF = 0.01  # Token Choice's load-balancing weight by default (Switch Transformer)
MOT_ROUTINGS = ("softmax", "uniform", "discrete")
LEARNABLE_TEMPERATURE = ("off", "shared", "per_expert")
EMBEDDING_INITS = ("fan_in_hidden", "unit_fan_in")
POSITION_EMBEDDING_TYPES = ("learned", "rope")
NORM_TYPES = ("layernorm", "rmsnorm")
ROPE_TYPES = ("default", *ROPE_INIT_FUNCTIONS)  # what transformers' rotary utilities compute
# Every Auto class we support, so a saved folder (and a Hub repo) loads with trust_remote_code=True anywhere.
AUTO_MAP = {
    "AutoConfig": "configuration_mot.MoTConfig",
    "AutoModel": "modeling_mot.MoTModel",
    "AutoModelForCausalLM": "modeling_mot.MoTForCausalLM",
}
ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu", "swish", "tanh", "sigmoid", "relu2")

# The paper's configurations (docs/design.md, "The model"; llm-random's configs). "/k" variants keep parameters and FLOPs but
# split each expert into k smaller ones: num_experts = group_size * k, expert_size = d_ff / k.
_MEDIUM = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048)
_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
# CPU-sized presets for tests, examples and the quick start. tiny-mot is flop-matched to tiny-dense:
# num_experts * expert_size / group_size = 8 * 256 / 8 = 256 = intermediate_size.
_TINY = dict(
    vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
    max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
)

# Modern counterparts (Llama-style blocks: rotary positions, RMSNorm, SwiGLU feed-forwards, grouped-query attention
# with half as many key/value heads). A gated layer has three matrices, so d_ff is 2/3 of the paper's (rounded up to
# a multiple of 16 or 64): the feed-forward's parameters and FLOPs stay those of the paper's ReLU layer.
_MODERN = dict(position_embedding_type="rope", norm_type="rmsnorm", gated_mlp=True, hidden_act="silu")
_MODERN_MEDIUM = dict(_MEDIUM, **_MODERN, intermediate_size=1408, num_key_value_heads=4)
_MODERN_TINY = dict(_TINY, **_MODERN, intermediate_size=176, num_key_value_heads=2)

PRESETS: dict[str, dict] = {
    "transformer-medium": dict(_MEDIUM, mlp_types=["dense"] * 8),
    "mot-medium-32e": dict(_MEDIUM, group_size=32, num_experts=32, expert_size=2048),
    "mot-medium-32e-8": dict(_MEDIUM, group_size=32, num_experts=256, expert_size=256),
    "mot-medium-32e-16": dict(_MEDIUM, group_size=32, num_experts=512, expert_size=128),
    "transformer-base": dict(_BASE, mlp_types=["dense"] * 12),
    "mot-base-32e": dict(_BASE, group_size=32, num_experts=32, expert_size=3072),
    "tiny-dense": dict(_TINY, mlp_types=["dense"] * 4, group_size=8, num_experts=8, expert_size=256),
    "tiny-mot": dict(_TINY, group_size=8, num_experts=8, expert_size=256),
    "modern-transformer-medium": dict(_MODERN_MEDIUM, mlp_types=["dense"] * 8),
    "modern-mot-medium-32e": dict(_MODERN_MEDIUM, group_size=32, num_experts=32, expert_size=1408),
    "tiny-modern-dense": dict(_MODERN_TINY, mlp_types=["dense"] * 4, group_size=8, num_experts=8, expert_size=176),
    "tiny-modern-mot": dict(_MODERN_TINY, group_size=8, num_experts=8, expert_size=176),
}


# The argument descriptions below are auto_docstring's; no line of them may start with "Return" or "Example", where
# transformers 5.9 ends the list.
@auto_docstring(
    custom_intro="""
    Configuration of a decoder-only Transformer whose feed-forward layers are dense, Mixture of Tokens, Token
    Choice or Expert Choice, chosen per block by `mlp_types`. Defaults are the paper's MoT-Medium/32E.
    """
)
@strict
class MoTConfig(PreTrainedConfig):
    r"""
    vocab_size (`int`):
        Size of the vocabulary (GPT-2's 50257 in the paper).
    hidden_size (`int`):
        Model width `d`.
    num_hidden_layers (`int`):
        Number of Transformer blocks.
    num_attention_heads (`int`):
        Attention heads; must divide `hidden_size`.
    intermediate_size (`int`):
        Width `d_ff` of the dense feed-forward layers.
    max_position_embeddings (`int`):
        Context length. It bounds the input only with learned positions; with RoPE it is the length the rotary
        utilities scale from (as in Llama).
    position_embedding_type (`str`):
        "learned" (absolute position embeddings, the paper's) or "rope" (rotary embeddings from transformers' own
        utilities). A "rope" config takes transformers 5's `rope_parameters` dict (`rope_type`, `rope_theta`, ...),
        or `rope_theta` / `rope_scaling` as transformers 5 reads them; a learned-position config has no
        `rope_parameters` attribute.
    norm_type (`str`):
        "layernorm" or "rmsnorm" (Llama's, with `rms_norm_eps`).
    gated_mlp (`bool`):
        False: `act(x W_up) W_down`; true: `(act(x W_gate) * (x W_up)) W_down` (SwiGLU with silu) in the dense
        feed-forward layers and in every expert of every routed layer. Flop-matching is unchanged:
        `num_experts * expert_size / group_size = intermediate_size` still gives a routed layer the dense layer's
        FLOPs, since both then have three matrices.
    num_key_value_heads (`int`):
        Key/value heads of grouped-query attention (default: `num_attention_heads`).
    attention_bias (`bool`):
        Biases on the query, key, value and output projections (Llama's `attention_bias`).
    mlp_bias (`bool`):
        Biases on the feed-forward projections, dense and experts (Llama's `mlp_bias`).
    mlp_types (`list[str]`):
        Feed-forward type of each block, one of "dense", "mot", "token_choice", "expert_choice". Default: first
        half dense, second half MoT, as in the paper.
    group_size (`int`):
        `G`, the number of sequences whose tokens at one position form a MoT group (also the group of Expert
        Choice).
    num_experts (`int`):
        `E`, experts per routed layer.
    expert_size (`int`):
        `f`, hidden width of each expert.
    mot_temperature (`float`):
        Initial (or fixed) softmax temperature of MoT's mixing weights. Not named `temperature`: that name would
        become the generation config's sampling temperature.
    learnable_temperature (`str`):
        "off" (fixed), "shared" (one learned temperature per layer) or "per_expert".
    mot_routing (`str`):
        "softmax" (the paper), "uniform" (controller frozen at zero, every weight 1/G) or "discrete" (temperature
        -> 0: each expert takes only its highest-scoring token of the group).
    num_experts_per_tok (`int`):
        `k` of Token Choice (and tokens per expert per group of Expert Choice are `k * group_size / num_experts`,
        which keeps its FLOPs equal to Token Choice's).
    capacity_factor (`float`):
        Token Choice capacity `cf * tokens * k / E` while training; eval is dropless.
    router_aux_loss_coef (`float`):
        Weight of Token Choice's load-balancing loss (default: Switch's 0.01). A config without Token Choice layers
        has no such loss: its coefficient is 0, whatever is given.
    router_z_loss_coef (`float`):
        Weight of Token Choice's router z-loss (0 = off).
    hidden_act (`str`):
        Activation of dense and expert layers (ReLU in the paper).
    init_scale (`float`):
        Weights are drawn from a truncated normal with std `sqrt(init_scale / fan_in)`.
    layer_norm_eps (`float`):
        Epsilon of the LayerNorms.
    embedding_init (`str`):
        "fan_in_hidden": token and position embeddings get std `sqrt(init_scale / hidden_size)` like every other
        weight; "unit_fan_in": the authors' code (fan-in 1, std `sqrt(init_scale)` cut at `+-2 * init_scale`, an
        actual std of about 0.11 with init_scale 0.1).
    final_norm (`bool`):
        LayerNorm before the output head (the authors' code has none).
    output_routing_stats (`bool`):
        Whether every forward returns per-layer routing statistics.
    output_router_logits (`bool`):
        Whether every forward returns the router logits of every Token Choice block (`[tokens, E]`, transformers'
        convention). The router losses are part of the training loss either way (unlike transformers' MoE models,
        where they need this flag). MoT's and Expert Choice's controller logits come with
        `output_controller_logits=True` passed to `forward`.
    mot_recompute (`bool`):
        In MoT layers while training, recompute the merged and processed tokens in backward instead of saving them
        (selective recomputation: one more forward of the experts, merge and emit; saved activations shrink about
        E/G-fold, far cheaper than checkpointing whole blocks).
    chunked_lm_loss (`bool`):
        While training with `labels`, compute the language-modelling loss a chunk of tokens at a time without
        materialising the full logits (`outputs.logits` is then None): the same loss and gradients in a fraction of
        the memory and time. False: always return the logits.
    """

    model_type = "mot"
    # The KV cache in outputs: `cache` from transformers 5.24, `past_key_values` before. Trainer drops it in eval.
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 50257
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    max_position_embeddings: int = 256
    position_embedding_type: str = "learned"
    norm_type: str = "layernorm"
    rms_norm_eps: float = 1e-6
    gated_mlp: bool = False
    num_key_value_heads: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    mlp_types: list[str] | None = None
    group_size: int = 32
    num_experts: int = 32
    expert_size: int = 2048
    mot_temperature: float = 1.0
    learnable_temperature: str = "off"
    mot_routing: str = "softmax"
    num_experts_per_tok: int = 1
    capacity_factor: float = 1.25
    router_aux_loss_coef: float | None = None
    router_z_loss_coef: float = 0.0
    hidden_act: str = "relu"
    init_scale: float = 0.1
    layer_norm_eps: float = 1e-5
    embedding_init: str = "fan_in_hidden"
    final_norm: bool = True
    output_routing_stats: bool = False
    output_router_logits: bool = False
    mot_recompute: bool = False
    chunked_lm_loss: bool = True
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256

    def __post_init__(self, **kwargs):
        if self.mlp_types is None:
            half = self.num_hidden_layers // 2
            self.mlp_types = ["dense"] * half + ["mot"] * (self.num_hidden_layers - half)
        else:
            self.mlp_types = list(self.mlp_types)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if "token_choice" not in self.mlp_types:
            # No token-routed layer, no load-balancing loss to weigh. Trainers read a non-zero coefficient as a model
            # that returns router logits (TRL then adds Mixtral's loss of logits that do not exist).
            self.router_aux_loss_coef = 0.0
        elif self.router_aux_loss_coef is None:
            self.router_aux_loss_coef = SWITCH_AUX_LOSS_COEF
        if self.learnable_temperature in (None, False):
            self.learnable_temperature = "off"
        elif self.learnable_temperature is True:
            self.learnable_temperature = "shared"
        # Only a rotary config has `rope_parameters` (transformers standardises it, from `rope_theta` /
        # `rope_scaling` too); a learned-position one has none, so nothing takes it for a RoPE model. Its RoPE
        # keys, as configs saved by earlier versions carry, are dropped.
        rope_keys = ("rope_parameters", "rope_theta", "rope_scaling")
        if self.position_embedding_type == "rope":
            self.rope_parameters = kwargs.pop("rope_parameters", None)
        else:
            kwargs = {key: value for key, value in kwargs.items() if key not in rope_keys}
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)
        self.validate_mot()

    def validate_mot(self) -> None:
        """Raise one clear `ValueError` for the first invalid field."""

        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "group_size", "num_experts",
                     "expert_size", "num_experts_per_tok", "num_key_value_heads"):
            positive_int(name)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(f"position_embedding_type must be one of {', '.join(POSITION_EMBEDDING_TYPES)}, got "
                             f"{self.position_embedding_type!r}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {', '.join(NORM_TYPES)}, got {self.norm_type!r}")
        if self.position_embedding_type == "rope" and (self.rope_parameters or {}).get("rope_type") not in ROPE_TYPES:
            raise ValueError(f"rope_parameters has rope_type {(self.rope_parameters or {}).get('rope_type')!r}; "
                             f"transformers knows {', '.join(ROPE_TYPES)}")
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got hidden_size / num_attention_heads = "
                             f"{self.head_dim}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if len(self.mlp_types) != self.num_hidden_layers:
            raise ValueError(
                f"mlp_types has {len(self.mlp_types)} entries but num_hidden_layers is {self.num_hidden_layers}; "
                "give one feed-forward type per block"
            )
        for mlp_type in self.mlp_types:
            if mlp_type not in MLP_TYPES:
                raise ValueError(f"unknown mlp type {mlp_type!r} in mlp_types; allowed: {', '.join(MLP_TYPES)}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_experts ({self.num_experts})"
            )
        if not (isinstance(self.mot_temperature, (int, float)) and math.isfinite(self.mot_temperature)
                and self.mot_temperature > 0):
            raise ValueError(f"mot_temperature must be a positive finite number, got {self.mot_temperature!r}")
        if self.learnable_temperature not in LEARNABLE_TEMPERATURE:
            raise ValueError(
                f"learnable_temperature must be one of {', '.join(LEARNABLE_TEMPERATURE)}, "
                f"got {self.learnable_temperature!r}"
            )
        if self.mot_routing not in MOT_ROUTINGS:
            raise ValueError(f"mot_routing must be one of {', '.join(MOT_ROUTINGS)}, got {self.mot_routing!r}")
        if not (isinstance(self.capacity_factor, (int, float)) and self.capacity_factor > 0):
            raise ValueError(f"capacity_factor must be positive, got {self.capacity_factor!r}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if not (isinstance(self.init_scale, (int, float)) and self.init_scale > 0):
            raise ValueError(f"init_scale must be positive, got {self.init_scale!r}")
        if self.embedding_init not in EMBEDDING_INITS:
            raise ValueError(f"embedding_init must be one of {', '.join(EMBEDDING_INITS)}, got {self.embedding_init!r}")
        for name in ("chunked_lm_loss", "mot_recompute", "output_routing_stats", "output_router_logits", "final_norm",
                     "gated_mlp", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {', '.join(ACTIVATIONS)}, got {self.hidden_act!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MoTConfig:
        """A configuration of the paper (`mot-medium-32e`, ...) or a CPU-sized one (`tiny-mot`, `tiny-dense`)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def routed_layer_types(self) -> list[str]:
        """The routed feed-forward types among `mlp_types` (a router and experts), in MLP_TYPES order."""
        return [kind for kind in ROUTED_TYPES if kind in self.mlp_types]

    @property
    def grouped_layer_types(self) -> list[str]:
        """The types among `mlp_types` that group rows of a batch (MoT, Expert Choice): if any, the model's output
        for one sequence depends on the other sequences of its batch."""
        return [kind for kind in GROUPED_TYPES if kind in self.mlp_types]


__all__ = ["MoTConfig", "PRESETS", "MLP_TYPES", "ROUTED_TYPES", "GROUPED_TYPES"]
