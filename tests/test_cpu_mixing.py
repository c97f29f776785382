"""The fused CPU mixing kernels (mixture_of_tokens/cpu_mixing.py): the same results as the batched matmuls."""

from __future__ import annotations

import logging
import os
import platform

import pytest
import torch

from mixture_of_tokens import MoTConfig, cpu_mixing
from mixture_of_tokens.modeling_mot import MixtureOfTokens, fused_cpu_mixing_kernels


@pytest.fixture(scope="module")
def kernels():
    loaded = cpu_mixing.load_kernels()
    if loaded is None:
        message = "the CPU mixing kernels did not build (see the warning above)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + "; under CI=true they must")
        pytest.skip(message)
    return loaded


@pytest.fixture(scope="module")
def portable_kernels(kernels):
    """The build a CPU without AVX512-BF16 gets (GCC/Clang vectors, bf16 converted to fp32), built here too."""
    if not kernels.uses_avx512_bf16():
        return kernels
    # No AVX-512 at all: what the common AVX2 CPUs build.
    portable = cpu_mixing.build(cpu_mixing._extension_name() + "_portable", extra_cflags=("-mno-avx512f",))
    assert not portable.uses_avx512_bf16()
    return portable


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as cpuinfo:
        return set(next(line for line in cpuinfo if line.startswith("flags")).split(":", 1)[1].split())


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="reads x86 /proc/cpuinfo")
def test_avx512_bf16_path_is_built_where_the_cpu_has_it(kernels):
    assert kernels.uses_avx512_bf16() == ({"avx512_bf16", "avx512bw"} <= cpu_flags())


def reference_merge(tokens, weights):
    """[n, G, S, d], [n, G, S, E] -> [E, n*S, d] by einsum in float64."""
    merged = torch.einsum("ngsd,ngse->ensd", tokens.double(), weights.double())
    return merged.reshape(weights.shape[-1], -1, tokens.shape[-1])


def reference_emit(expert_rows, weights):
    n, G, S, E = weights.shape
    rows = expert_rows.double().view(E, n, S, -1)
    return torch.einsum("ensd,ngse->ngsd", rows, weights.double())


def reference_dots(tokens, expert_rows, weights_shape):
    n, G, S, E = weights_shape
    rows = expert_rows.double().view(E, n, S, -1)
    return torch.einsum("ngsd,ensd->ngse", tokens.double(), rows)


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 8, 5, 64, 4), (3, 4, 7, 128, 12), (2, 32, 3, 64, 32)])
def test_kernels_match_einsum(request, build, dtype, shape):
    kernels = request.getfixturevalue("kernels" if build == "native" else "portable_kernels")
    n, G, S, d, E = shape
    tokens = torch.randn(n, G, S, d).to(dtype)
    expert_rows = torch.randn(E, n * S, d).to(dtype)
    weights = torch.randn(n, G, S, E).softmax(dim=1)
    # The kernels multiply bf16 activations by bf16-rounded weights, as the batched-matmul path does.
    rounded_weights = weights.to(dtype).float()
    tolerance = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)

    merged = torch.empty(E, n * S, d, dtype=dtype)
    kernels.mix(tokens, merged, weights, True)
    torch.testing.assert_close(merged.double(), reference_merge(tokens, rounded_weights), **tolerance)

    emitted = torch.empty(n, G, S, d, dtype=dtype)
    kernels.mix(emitted, expert_rows, weights, False)
    torch.testing.assert_close(emitted.double(), reference_emit(expert_rows, rounded_weights), **tolerance)

    products = torch.empty(n, G, S, E)
    kernels.dots(tokens, expert_rows, products)
    expected = reference_dots(tokens, expert_rows, weights.shape)
    torch.testing.assert_close(products.double(), expected, atol=1e-3 * d**0.5, rtol=1e-4)

    # The fused backward pass: an emit and the dot products in one sweep give the same as separately.
    fused_products = torch.full_like(products, float("nan"))
    fused_emitted = torch.empty_like(emitted)
    kernels.mix(fused_emitted, expert_rows, weights, False, tokens, expert_rows, fused_products)
    assert torch.equal(fused_emitted, emitted)
    assert torch.equal(fused_products, products)


def test_kernels_reject_bad_input(kernels):
    tokens = torch.randn(1, 8, 2, 64)
    weights = torch.randn(1, 8, 2, 4).softmax(1)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        kernels.mix(tokens.half(), torch.empty(4, 2, 64).half(), weights, True)
    with pytest.raises(RuntimeError, match="divisible by 4"):
        kernels.mix(torch.randn(1, 6, 2, 64), torch.empty(4, 2, 64), torch.randn(1, 6, 2, 4), True)
    with pytest.raises(RuntimeError, match="do not match"):
        kernels.mix(tokens, torch.empty(4, 3, 64), weights, True)


def test_failed_build_falls_back_with_a_warning(kernels, monkeypatch, tmp_path, caplog):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_mixing, "SOURCE", broken)
    monkeypatch.setattr(cpu_mixing, "_extension_name", lambda: "mot_mixing_broken_for_test")
    monkeypatch.setattr(cpu_mixing, "_attempted", False)
    monkeypatch.setattr(cpu_mixing, "_kernels", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    with caplog.at_level(logging.WARNING, logger=cpu_mixing.__name__):
        assert cpu_mixing.load_kernels() is None
        assert cpu_mixing.load_kernels() is None  # tried once per process, not at every layer call
    assert caplog.text.count("Could not build the MoT CPU mixing kernels") == 1
    layer = mot_layer()
    output, _ = layer(torch.randn(8, 3, 64))  # the layer still runs, on batched matmuls
    assert output.shape == (8, 3, 64) and "FusedMixingBackward" not in autograd_node_names(output)


def mot_layer(**overrides) -> MixtureOfTokens:
    config = MoTConfig(hidden_size=64, group_size=8, num_experts=8, expert_size=32, **overrides)
    torch.manual_seed(0)
    layer = MixtureOfTokens(config)
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return layer


def autograd_node_names(output: torch.Tensor) -> set[str]:
    seen, pending = set(), [output.grad_fn]
    while pending:
        node = pending.pop()
        if node is not None and node not in seen:
            seen.add(node)
            pending.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def forward_backward(layer, inputs, token_mask, use_kernels, monkeypatch, output_stats=False):
    monkeypatch.setenv(cpu_mixing.DISABLE_VARIABLE, "1" if use_kernels else "0")
    inputs = inputs.detach().requires_grad_()
    layer.zero_grad(set_to_none=True)
    output, extra = layer(inputs, token_mask=token_mask, output_stats=output_stats)
    # Both paths must actually have run: the fused one leaves its own autograd nodes in the graph.
    assert ("FusedMixingBackward" in autograd_node_names(output)) == use_kernels
    output.backward(torch.linspace(-1, 1, output.numel()).view_as(output).to(output.dtype))
    grads = {name: parameter.grad.clone() for name, parameter in layer.named_parameters() if parameter.grad is not None}
    return output.detach(), inputs.grad, grads, extra.stats


def flatten(results) -> dict[str, torch.Tensor]:
    output, input_grad, grads, stats = results
    return {"output": output, "input.grad": input_grad, **{f"{name}.grad": grad for name, grad in grads.items()},
            **{f"stats.{name}": value for name, value in (stats or {}).items()}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"learnable_temperature": "per_expert", "mot_temperature": 0.5},
        {"mot_routing": "discrete"},
        {"mot_routing": "uniform"},
    ],
    ids=["softmax", "learnable_temperature", "discrete", "uniform"],
)
@pytest.mark.parametrize("batch_size", [16, 13], ids=["full_groups", "padded_group"])
def test_layer_matches_batched_matmuls(kernels, monkeypatch, dtype, overrides, batch_size):
    layer = mot_layer(**overrides).to(dtype).train()
    inputs = torch.randn(batch_size, 6, 64).to(dtype)
    token_mask = torch.ones(batch_size, 6, dtype=torch.bool)
    token_mask[0, :2] = False  # left padding in one sequence
    fused = flatten(forward_backward(layer, inputs, token_mask, True, monkeypatch, output_stats=True))
    plain = flatten(forward_backward(layer, inputs, token_mask, False, monkeypatch, output_stats=True))
    assert fused.keys() == plain.keys() and "router.grad" in fused or overrides.get("mot_routing") == "uniform"
    if dtype == torch.float32:
        for name in plain:
            scale = plain[name].abs().max().item() + 1e-6
            torch.testing.assert_close(fused[name] / scale, plain[name] / scale, atol=1e-5, rtol=1e-4, msg=name)
        return
    # In bf16 both paths round, differently (the fused one keeps the weights' gradient in fp32 longer, and the
    # softmax backward amplifies rounding): measure both against the same bf16 values computed in fp32.
    truth = flatten(forward_backward(layer.float(), inputs.float(), token_mask, False, monkeypatch, True))
    for name in plain:
        fused_error = (fused[name].float() - truth[name]).abs().max().item()
        plain_error = (plain[name].float() - truth[name]).abs().max().item()
        scale = truth[name].abs().max().item()
        assert fused_error <= 1.5 * plain_error + 1e-2 * scale, (name, fused_error, plain_error, scale)


def test_results_do_not_depend_on_thread_count(kernels, monkeypatch):
    layer = mot_layer().to(torch.bfloat16)
    inputs = torch.randn(16, 9, 64).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = forward_backward(layer, inputs, None, True, monkeypatch)
        torch.set_num_threads(max(2, threads))
        several = forward_backward(layer, inputs, None, True, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single[0], several[0]) and torch.equal(single[1], several[1])


def test_double_backward_is_refused_clearly(kernels, monkeypatch):
    monkeypatch.setenv(cpu_mixing.DISABLE_VARIABLE, "1")
    layer = mot_layer()
    inputs = torch.randn(8, 3, 64, requires_grad=True)
    output, _ = layer(inputs)
    (input_grad,) = torch.autograd.grad(output.square().sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        input_grad.sum().backward()


def test_kernels_only_where_they_apply(kernels, monkeypatch):
    tokens = torch.zeros(1, 8, 2, 64)
    assert fused_cpu_mixing_kernels(tokens, num_experts=8) is kernels
    assert fused_cpu_mixing_kernels(tokens.half(), num_experts=8) is None  # float16: batched matmuls
    assert fused_cpu_mixing_kernels(tokens[..., :48], num_experts=8) is None  # d not a multiple of 64
    assert fused_cpu_mixing_kernels(tokens, num_experts=6) is None
    monkeypatch.setenv(cpu_mixing.DISABLE_VARIABLE, "0")
    assert fused_cpu_mixing_kernels(tokens, num_experts=8) is None
