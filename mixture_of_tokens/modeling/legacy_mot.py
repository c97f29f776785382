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
"""Checkpoints of Mixture of Tokens models saved with the parameter names used before the model took transformers'
MoE layout (fused `qkv_proj`, `attn_norm`/`mlp_norm`, `router [d, E]`, experts `w1`/`w_gate`/`w2`, `b1`/`b_gate`/`b2`).
`MoTPreTrainedModel.from_pretrained` converts them on the way in. This file travels to the Hub with `modeling_mot.py`.
"""

import json

import torch

from .configuration_mot import MoTConfig

# transformers' own key mapping (`register_checkpoint_conversion_mapping`) does not fit these checkpoints: across the
# supported releases its operations differ (no size-aware split before 5.18), it skips custom code unless registered
# globally, and `save_pretrained` would write the old names back. `from_pretrained` converts them instead.


def is_legacy_state_dict(names) -> bool:
    return any(name.endswith((".qkv_proj.weight", ".mlp.router", ".attn_norm.weight")) for name in names)


def convert_legacy_state_dict(state_dict: dict[str, torch.Tensor], config: MoTConfig) -> dict[str, torch.Tensor]:
    """A state dict with the earlier names (fused `qkv_proj`, `attn_norm`/`mlp_norm`, `router [d, E]`, experts
    `w1`/`w_gate [E, d, f]`, `w2 [E, f, d]`, `b1`/`b_gate`/`b2`) in today's names; the experts keep their layout."""
    converted = {}
    sizes = [config.num_attention_heads * config.head_dim] + [config.num_key_value_heads * config.head_dim] * 2
    for name, tensor in state_dict.items():
        stem, _, leaf = name.rpartition(".")
        if ".attn_norm." in name or ".mlp_norm." in name:
            name = name.replace(".attn_norm.", ".input_layernorm.").replace(".mlp_norm.", ".post_attention_layernorm.")
            converted[name] = tensor
        elif stem.endswith(".self_attn.qkv_proj"):
            base = stem.removesuffix("qkv_proj")
            for part, piece in zip("qkv", tensor.split(sizes, dim=0), strict=True):
                converted[f"{base}{part}_proj.{leaf}"] = piece.contiguous()
        elif stem.endswith(".mlp") and leaf == "router":
            converted[f"{stem}.gate.weight"] = tensor.t().contiguous()
        elif stem.endswith(".mlp") and leaf in ("w1", "w_gate", "b1", "b_gate"):
            if leaf in ("w1", "b1"):  # the up projection, joined after the gate's when gated
                gate = state_dict.get(f"{stem}.{'w_gate' if leaf == 'w1' else 'b_gate'}")
                target = ("gate_up_proj" if gate is not None else "up_proj") + ("" if leaf == "w1" else "_bias")
                up = tensor if gate is None else torch.cat([gate, tensor], dim=-1)  # [E, d, 2f] / [E, 2f]
                converted[f"{stem}.experts.{target}"] = up.contiguous()
        elif stem.endswith(".mlp") and leaf == "w2":
            converted[f"{stem}.experts.down_proj"] = tensor
        elif stem.endswith(".mlp") and leaf == "b2":
            converted[f"{stem}.experts.down_proj_bias"] = tensor
        else:
            converted[name] = tensor
    return converted


def read_legacy_checkpoint(model_class, path, kwargs) -> tuple[dict, MoTConfig, dict] | None:
    """The converted tensors, config and Hub arguments of the safetensors checkpoint at `path` (a folder or a Hub id,
    with `from_pretrained`'s Hub arguments) if it uses the earlier names, else None (only one header was read)."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    hub = {key: kwargs[key] for key in ("cache_dir", "force_download", "local_files_only", "token", "revision",
                                        "subfolder", "proxies") if kwargs.get(key) is not None}

    def fetch(filename):
        return cached_file(path, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **hub)

    files = [fetch("model.safetensors")]
    if files[0] is None:
        index = fetch("model.safetensors.index.json")
        if index is None:
            return None
        with open(index) as handle:
            files = [fetch(name) for name in sorted(set(json.load(handle)["weight_map"].values()))]
    with safe_open(files[0], framework="pt") as handle:
        if not is_legacy_state_dict(handle.keys()):
            return None
    state_dict = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            state_dict.update({name: handle.get_tensor(name) for name in handle.keys()})
    config = kwargs.get("config")
    if not isinstance(config, MoTConfig):
        config = model_class.config_class.from_pretrained(path, **hub)
    return convert_legacy_state_dict(state_dict, config), config, hub
