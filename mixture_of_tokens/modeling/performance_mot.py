"""Performance paths of the Mixture of Tokens model, apart from the method in `modeling_mot.py` (as fla keeps its
kernels in `fla/ops`). Each computes exactly what its plain version does, faster or in less memory:
- `chunked_lm_loss`: the training loss without the full `[tokens, vocab]` logits (`config.chunked_lm_loss`);
- `ContiguousTranspose`: a layout change whose gradient is made contiguous once;
- `MergeExpertMajor`, `EmitExpertMajor`: MoT's merge and emit with the experts' tokens in their own layout, for the
  batched matmuls that copy strided operands (`batched_matmul_copies_views`);
- `MergeWithKernels`, `EmitWithKernels`: the same through compiled kernels that read and write that layout directly,
  where someone supplies them (`MixtureOfTokens.mixing_kernels`);
- `ExpertProductsWithKernels`, `expert_product`: the experts' batched products through compiled kernels, where someone
  supplies them (`MoTExperts.product_kernels`);
- `drop_group_padding`: no slice (and no zero-filled gradient) when a batch needs no group padding.

Plain torch: compiled kernels are handed in, never imported. This file travels to the Hub with `modeling_mot.py`,
which imports it relatively (transformers copies such imports of custom code), so it imports only installed packages.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's where it is on, else the tensor's own."""
    if torch.is_autocast_enabled(tensor.device.type):
        return torch.get_autocast_dtype(tensor.device.type)
    return tensor.dtype


class ContiguousTranspose(torch.autograd.Function):
    """`x.transpose(dim0, dim1).contiguous()` whose gradient is made contiguous once, too.

    Plain autograd hands the transposed *view* of the gradient back, and each batched matmul that consumes it in
    its backward (usually two) copies it again; MoT's layout changes between token-major, position-major and
    expert-major would otherwise cost several extra activation-sized copies per step.
    """

    @staticmethod
    def forward(ctx, tensor, dim0, dim1):
        ctx.dims = (dim0, dim1)
        return tensor.transpose(dim0, dim1).contiguous()

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output.transpose(*ctx.dims).contiguous(), None, None


def batched_matmul_copies_views(tensor: torch.Tensor) -> bool:
    """Whether torch's batched matmul copies an operand like `tensor` that is neither contiguous nor a transposed
    contiguous tensor (say `[E, p, d]` read from `[p, E, d]` storage) before it multiplies.

    On CPU, bf16 and fp16 run through oneDNN wherever the CPU has the instructions for it (AVX-512 for bf16; a slow
    generic kernel elsewhere, for which the layout matters little). oneDNN takes only those two layouts and copies
    anything else first, element by element where the operand's last dimension is strided (a `[p, d, E]` operand
    read from `[E, p, d]` storage: about 190 ms for 128 MiB on an AVX512-BF16 EPYC, where the whole MoT/32E/16 layer
    takes 500 ms). fp32 (MKL) and CUDA (cuBLAS) read such views as they lie.
    """
    return tensor.device.type == "cpu" and tensor.dtype in (torch.bfloat16, torch.float16)


def bmm_into(batch1: torch.Tensor, batch2: torch.Tensor, out: torch.Tensor) -> None:
    """`torch.bmm(batch1, batch2, out=out)` for an `out` that is a strided view. Eager bf16 writes such an `out`
    for less than a product and a copy (21 vs 27 ms at MoT/32E/16's merge); Dynamo refuses a strided `out=`, so
    compiled code copies."""
    if torch.compiler.is_compiling():
        out.copy_(torch.bmm(batch1, batch2))
    else:
        torch.bmm(batch1, batch2, out=out)


class MergeExpertMajor(torch.autograd.Function):
    """MoT's merge, weights `[p, G, E]` and tokens `[p, G, d]` -> merged tokens `[E, p, d]`, contiguous (the layout
    the experts' batched matmuls read without a copy).

    The `[p, E, d]` products are written straight into that layout; in backward the gradient is made position-major
    once for the two products that read it, rather than copied by each.
    """

    @staticmethod
    def forward(ctx, mixing, tokens):
        num_positions, _, num_experts = mixing.shape
        merged = tokens.new_empty(num_experts, num_positions, tokens.shape[-1])
        bmm_into(mixing.transpose(1, 2), tokens, merged.transpose(0, 1))  # [p, E, G] @ [p, G, d] -> [p, E, d]
        ctx.save_for_backward(mixing, tokens)
        return merged

    @staticmethod
    def backward(ctx, grad_merged):
        mixing, tokens = ctx.saved_tensors
        grad = grad_merged.transpose(0, 1).contiguous()  # [E, p, d] -> [p, E, d]
        grad_mixing = grad_tokens = None
        if ctx.needs_input_grad[0]:
            grad_mixing = torch.bmm(tokens, grad.transpose(1, 2))  # [p, G, d] @ [p, d, E] -> [p, G, E]
        if ctx.needs_input_grad[1]:
            grad_tokens = torch.bmm(mixing, grad)  # [p, G, E] @ [p, E, d] -> [p, G, d]
        return grad_mixing, grad_tokens


class EmitExpertMajor(torch.autograd.Function):
    """MoT's emit, weights `[p, G, E]` and processed tokens `[E, p, d]` (the experts' layout) -> `[p, G, d]`.

    The processed tokens are made position-major once, and that copy is what backward reads; their gradient is
    written straight into the experts' layout.
    """

    @staticmethod
    def forward(ctx, mixing, processed):
        processed = processed.transpose(0, 1).contiguous()  # [E, p, d] -> [p, E, d]
        ctx.save_for_backward(mixing, processed)
        return torch.bmm(mixing, processed)  # [p, G, E] @ [p, E, d] -> [p, G, d]

    @staticmethod
    def backward(ctx, grad_output):
        mixing, processed = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        grad_mixing = grad_processed = None
        if ctx.needs_input_grad[0]:
            grad_mixing = torch.bmm(grad_output, processed.transpose(1, 2))  # [p, G, d] @ [p, d, E] -> [p, G, E]
        if ctx.needs_input_grad[1]:
            num_positions, _, num_experts = mixing.shape
            grad_processed = grad_output.new_empty(num_experts, num_positions, grad_output.shape[-1])
            # [p, E, G] @ [p, G, d] -> [p, E, d], written into the [E, p, d] gradient
            bmm_into(mixing.transpose(1, 2), grad_output, grad_processed.transpose(0, 1))
        return grad_mixing, grad_processed


class MergeWithKernels(torch.autograd.Function):
    """`MergeExpertMajor` through compiled kernels: weights `[p, G, E]`, tokens `[p, G, d]` -> merged tokens
    `[E, p, d]`. `kernels` has `merge(weights, tokens)`, `emit(weights, rows)`, `dots(weights, tokens, rows)` (the
    weights' gradient: each token of a position dotted with each expert's row of it) and `emit_and_dots(weights,
    rows, tokens)` (both in one pass over the rows), on contiguous tensors."""

    @staticmethod
    def forward(ctx, mixing, tokens, kernels):
        mixing, tokens = mixing.contiguous(), tokens.contiguous()
        ctx.save_for_backward(mixing, tokens)
        ctx.kernels = kernels
        return kernels.merge(mixing, tokens)

    @staticmethod
    @once_differentiable  # the kernels have no derivatives of their own: a double backward gets a clear error
    def backward(ctx, grad_merged):
        mixing, tokens = ctx.saved_tensors
        grad_tokens, grad_mixing = ctx.kernels.emit_and_dots(mixing, grad_merged.contiguous(), tokens)
        return grad_mixing, grad_tokens, None


class EmitWithKernels(torch.autograd.Function):
    """`EmitExpertMajor` through compiled kernels (`MergeWithKernels`): weights `[p, G, E]`, processed tokens
    `[E, p, d]` -> `[p, G, d]`."""

    @staticmethod
    def forward(ctx, mixing, processed, kernels):
        mixing, processed = mixing.contiguous(), processed.contiguous()
        ctx.save_for_backward(mixing, processed)
        ctx.kernels = kernels
        return kernels.emit(mixing, processed)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        mixing, processed = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        grad_mixing = ctx.kernels.dots(mixing, grad_output, processed) if ctx.needs_input_grad[0] else None
        grad_processed = ctx.kernels.merge(mixing, grad_output) if ctx.needs_input_grad[1] else None
        return grad_mixing, grad_processed, None


class ExpertProductsWithKernels(torch.autograd.Function):
    """`torch.bmm(inputs, weight)` for the experts' stacked weights, `[E, N, in] @ [E, in, out]`, through compiled
    kernels: `kernels.expert_products(a, b)` takes each operand row-major per expert or as a transposed view (as bmm
    does), so that the gradients' products read the saved tensors as they lie."""

    @staticmethod
    def forward(ctx, inputs, weight, kernels):
        ctx.save_for_backward(inputs, weight)
        ctx.kernels = kernels
        return kernels.expert_products(inputs, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        inputs, weight = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        products = ctx.kernels.expert_products
        grad_inputs = products(grad_output, weight.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_weight = products(inputs.transpose(1, 2), grad_output) if ctx.needs_input_grad[1] else None
        return grad_inputs, grad_weight, None


def expert_product(inputs: torch.Tensor, weight: torch.Tensor, product_kernels) -> torch.Tensor | None:
    """`inputs @ weight` (`[E, N, in] @ [E, in, out]`) through the kernels `product_kernels(inputs, weight)` returns,
    or None where it returns none. Under autocast the weight is cast first, as autocast's bmm would."""
    device = inputs.device.type
    autocast_to_inputs = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == inputs.dtype
    if weight.dtype != inputs.dtype and autocast_to_inputs:
        weight = weight.to(inputs.dtype)
    kernels = product_kernels(inputs, weight)
    return None if kernels is None else ExpertProductsWithKernels.apply(inputs, weight, kernels)


def drop_group_padding(hidden_states: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Undo `group_rows`' padding: `[n * G, S, d]` -> `[batch_size, S, d]`. Slices only when there is padding, since
    a slice's backward builds a zero gradient for the whole padded batch and copies into it."""
    return hidden_states if hidden_states.shape[0] == batch_size else hidden_states[:batch_size]


# fp32 logits held at once by the chunked loss: 256 MiB (1335 tokens of GPT-2's 50257-token vocabulary).
LM_LOSS_CHUNK_ELEMENTS = 2**26


class ChunkedLMLoss(torch.autograd.Function):
    """Summed cross-entropy of the logits `hidden @ weight.T` against `targets` (-100: ignored), computed a chunk
    of tokens at a time so the full `[tokens, vocab]` logits never exist.

    The plain path holds them several times over in fp32 (logits, log-softmax, its gradient: ~5 GB for 32 x 256
    tokens of GPT-2's vocabulary) and makes as many memory-bound passes over them. Here each chunk's logits give
    its loss and, at once, its gradients for `hidden` and `weight`; backward only scales them by the incoming
    gradient. The FLOPs are the plain path's: one logits matmul and two gradient matmuls per token.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype):
        # hidden [N, d], weight [V, d], targets [N]
        num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
        chunk_tokens = max(1, LM_LOSS_CHUNK_ELEMENTS // vocab_size)
        need_weight_grad = ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            weight_compute = weight.to(compute_dtype)
            loss = hidden.new_zeros((), dtype=torch.float32)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight_grad else None
            for start in range(0, num_tokens, chunk_tokens):
                tokens = hidden[start : start + chunk_tokens].to(compute_dtype)  # [n, d]
                chunk_targets = targets[start : start + chunk_tokens]
                valid = chunk_targets != -100
                safe_targets = chunk_targets.clamp_min(0).unsqueeze(1)  # [n, 1]
                logits = (tokens @ weight_compute.T).float()  # [n, V]
                log_normaliser = torch.logsumexp(logits, dim=1)  # [n]
                loss += ((log_normaliser - logits.gather(1, safe_targets).squeeze(1)) * valid).sum()
                # d loss / d logits = softmax - one_hot(target) on valid rows, zero on ignored ones: an infinite
                # normaliser makes an ignored row's softmax exactly zero in the same pass (in place, no new buffer).
                log_normaliser = log_normaliser.masked_fill(~valid, math.inf)
                grad_logits = logits.sub_(log_normaliser.unsqueeze(1)).exp_()
                grad_logits.scatter_add_(1, safe_targets, -valid.unsqueeze(1).float())
                grad_logits = grad_logits.to(compute_dtype)
                grad_hidden[start : start + chunk_tokens] = grad_logits @ weight_compute
                if need_weight_grad:
                    grad_weight += grad_logits.T @ tokens  # [V, n] @ [n, d], accumulated over chunks in fp32
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight, None, None


def chunked_lm_loss(hidden_states, labels, weight, num_items_in_batch=None, shift_labels=None, **kwargs):
    """The loss transformers' `ForCausalLMLoss` gives for the logits `hidden_states @ weight.T`, through
    `ChunkedLMLoss` (the logits never exist as a whole). `num_items_in_batch` and `shift_labels` as in transformers."""
    if shift_labels is None:
        # Position t predicts labels[t + 1]; the last position predicts nothing.
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    loss_sum = ChunkedLMLoss.apply(hidden, weight, targets, compute_dtype(weight))
    if num_items_in_batch is None:
        return loss_sum / (targets != -100).sum()
    return loss_sum / torch.as_tensor(num_items_in_batch, device=loss_sum.device)
