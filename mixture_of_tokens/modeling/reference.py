"""A naive reference of the MoT layer: the paper's equations with plain loops over groups, positions and experts.

It reads the weights of a `MixtureOfTokens` layer and computes, for every group of `G` contiguous rows and every
position (docs/design.md, the five steps):

    w[g, e] = softmax over the group's real tokens g of (x[g] . W_c[e]) / T
    m_e     = sum_g w[g, e] x[g]
    y[g]    = sum_e w[g, e] expert_e(m_e)

Padding (mask 0) takes no part and gets y = 0; a batch that is not a multiple of `G` ends with a smaller group.
Tests compare the vectorised layer with it, and `bench/layer.py` times it alongside. Slow by design.
"""

from __future__ import annotations

import torch


def mixture_of_tokens_reference(layer, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None):
    """`[B, S, d]` (and a `[B, S]` mask of real tokens) -> `[B, S, d]`, what `layer(hidden_states, token_mask)`
    computes (softmax routing; "uniform" routing uses a zero controller). Differentiable, so the layer's gradients
    can be judged too; call it under `torch.no_grad()` for outputs alone."""
    batch_size, seq_len, _ = hidden_states.shape
    group_size, num_experts = layer.group_size, layer.num_experts
    dtype = torch.promote_types(hidden_states.dtype, torch.float32)  # fp32, or the input's if wider
    temperature = torch.as_tensor(layer.temperature(), dtype=dtype).expand(num_experts)
    controller = layer.gate.weight.to(dtype)  # [E, d]
    if layer.routing == "uniform":
        controller = torch.zeros_like(controller)
    output = torch.zeros_like(hidden_states, dtype=dtype)
    for start in range(0, batch_size, group_size):
        rows = range(start, min(start + group_size, batch_size))
        for position in range(seq_len):
            real = [row for row in rows if token_mask is None or bool(token_mask[row, position])]
            if not real:
                continue
            tokens = hidden_states[real, position].to(dtype)  # [g, d]
            for expert in range(num_experts):
                scores = tokens @ controller[expert] / temperature[expert]  # [g]
                weights = torch.softmax(scores, dim=0)  # over the group's tokens
                mixed = weights @ tokens  # [d]
                processed = layer.experts.process_one(expert, mixed.unsqueeze(0).to(hidden_states.dtype))[0]
                for weight, row in zip(weights, real, strict=True):
                    output[row, position] += weight * processed.to(dtype)
    return output.to(hidden_states.dtype)
