"""MoT's CPU kernels (mixture_of_tokens/cpu_kernels.py, csrc/kernels_cpu.cpp), the merge and emit and the experts'
products: the batched matmuls' results, taken by the layer where they apply, and a plain fallback where they cannot
be built."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mixture_of_tokens import MoTConfig, cpu_kernels
from mixture_of_tokens.modeling.modeling_mot import MixtureOfTokens, MoTExperts

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def kernels():
    if not cpu_kernels.cpu_runs_kernels():
        pytest.skip("this CPU has no AVX512-BF16 (or has AMX): the layer runs oneDNN's batched matmuls")
    loaded = cpu_kernels.load_kernels()
    if loaded is None:
        message = "the CPU kernels did not build (see the warning above)"
        if IN_CI:
            pytest.fail(message + "; under CI=true, on a CPU that runs them, they must")
        pytest.skip(message)
    return loaded


def bf16_rounding_bound(expected: torch.Tensor) -> torch.Tensor:
    """What rounding an exact result to bf16 may change in each element (half a unit in the last place, 2^-9
    relative), plus float32 summation noise."""
    return expected.abs() * 2.0**-8 + 1e-6


# (positions, G, E, d): the paper's G = 32 at E = 32 and at /16's E = 16 G, the other group sizes the kernels take,
# and expert counts that leave a tile's remainder.
SHAPES = [(3, 32, 32, 64), (2, 32, 512, 64), (5, 16, 6, 128), (2, 48, 34, 64), (3, 64, 10, 192)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "p{}-G{}-E{}-d{}".format(*shape))
def test_kernels_compute_merge_emit_and_dots_as_exact_sums_rounded_once(kernels, shape):
    positions, group_size, num_experts, hidden_size = shape
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(positions, group_size, hidden_size, generator=generator).bfloat16()
    rows = torch.randn(num_experts, positions, hidden_size, generator=generator).bfloat16()
    mixing = torch.randn(positions, group_size, num_experts, generator=generator).softmax(dim=1).bfloat16()
    w, x, r = mixing.double(), tokens.double(), rows.double()
    expected = {
        "merge": torch.einsum("pge,pgd->epd", w, x),
        "emit": torch.einsum("pge,epd->pgd", w, r),
        "dots": torch.einsum("pgd,epd->pge", x, r),
    }
    emitted, dotted = kernels.emit_and_dots(mixing, rows, tokens)
    results = {
        "merge": kernels.merge(mixing, tokens),
        "emit": kernels.emit(mixing, rows),
        "dots": kernels.dots(mixing, tokens, rows),
        "emit_and_dots emit": emitted,
        "emit_and_dots dots": dotted,
    }
    for name, result in results.items():
        exact = expected[name.split()[-1]]
        assert result.dtype == torch.bfloat16 and result.shape == exact.shape, name
        error = (result.double() - exact).abs()
        assert (error <= bf16_rounding_bound(exact)).all(), (name, error.max().item())


def test_kernels_refuse_what_they_do_not_take_in_one_line(kernels):
    tokens, mixing = torch.zeros(2, 32, 64, dtype=torch.bfloat16), torch.zeros(2, 32, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="contiguous bfloat16 CPU tensors; the mixing weights is not"):
        kernels.merge(mixing.float(), tokens)
    with pytest.raises(RuntimeError, match=r"group_size in \{16, 32, 48, 64\}.*got 8, 8, 64"):
        kernels.merge(mixing[:, :8].contiguous(), tokens[:, :8].contiguous())
    with pytest.raises(RuntimeError, match=r"tokens has shape \[2, 32, 32\], expected \[2, 32, 64\]"):
        kernels.dots(mixing, tokens[..., :32].contiguous(), torch.zeros(8, 2, 64, dtype=torch.bfloat16))


# (E, M, K, N) of `[E, M, K] @ [E, K, N]`: /16's experts (d = 512, f = 128) at a few rows, rows that leave each tile
# remainder, and square and wide products.
PRODUCT_SHAPES = [(3, 10, 512, 128), (2, 7, 128, 512), (4, 64, 64, 64), (2, 33, 96, 192), (5, 2, 64, 128)]


def operand(shape: tuple[int, int, int], transposed: bool, generator: torch.Generator) -> torch.Tensor:
    """A random bf16 `[E, rows, columns]` operand, row-major per expert or a transposed view of one."""
    experts, rows, columns = shape
    if transposed:
        return torch.randn(experts, columns, rows, generator=generator).bfloat16().transpose(1, 2)
    return torch.randn(experts, rows, columns, generator=generator).bfloat16()


@pytest.mark.parametrize("layout", ["plain", "a transposed", "b transposed"])
@pytest.mark.parametrize("shape", PRODUCT_SHAPES, ids=lambda shape: "E{}-M{}-K{}-N{}".format(*shape))
def test_expert_products_are_exact_sums_rounded_once(kernels, shape, layout):
    experts, rows, inner, columns = shape
    if layout == "b transposed" and inner % 32:
        pytest.skip("a transposed b needs K a multiple of 32")
    generator = torch.Generator().manual_seed(0)
    a = operand((experts, rows, inner), layout == "a transposed", generator)
    b = operand((experts, inner, columns), layout == "b transposed", generator)
    exact = torch.bmm(a.double(), b.double())
    result = kernels.expert_products(a, b)
    assert result.dtype == torch.bfloat16 and result.shape == exact.shape and result.is_contiguous()
    error = (result.double() - exact).abs()
    assert (error <= bf16_rounding_bound(exact)).all(), error.max().item()


def test_expert_products_refuse_what_they_do_not_take_in_one_line(kernels):
    a, b = torch.zeros(2, 4, 64, dtype=torch.bfloat16), torch.zeros(2, 64, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="take 3-d bfloat16 CPU tensors; a is not"):
        kernels.expert_products(a.float(), b)
    with pytest.raises(RuntimeError, match=r"N a multiple of 64.*got K = 64, N = 32"):
        kernels.expert_products(a, b[..., :32])
    with pytest.raises(RuntimeError, match=r"do not multiply"):
        kernels.expert_products(a, b[:, :32])
    with pytest.raises(RuntimeError, match="row-major or a transposed view per expert"):
        kernels.expert_products(a, torch.zeros(2 * 8192, dtype=torch.bfloat16).as_strided((2, 64, 64), (8192, 128, 2)))


def kernel_config(**overrides) -> MoTConfig:
    """A MoT layer the kernels take: G = 16, E = 16 G experts (the /16 shape), d = 64."""
    base = dict(vocab_size=11, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                group_size=16, num_experts=256, expert_size=8, mlp_types=["mot"])
    return MoTConfig(**(base | overrides))


def random_layer(config: MoTConfig) -> MixtureOfTokens:
    layer = MixtureOfTokens(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return layer.bfloat16().train()


def graph_nodes(tensor: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind `tensor`."""
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("case", ["plain", "padded", "recompute", "uniform"])
def test_bf16_mot_layer_takes_the_kernels_and_gives_the_batched_matmuls_outputs_and_gradients(kernels, case):
    """The layer in CPU bf16 merges and emits through the kernels; its outputs and the gradients of its input and
    every weight agree with the batched matmuls' (the expert-major layout, judged against the naive reference in
    tests/test_model.py): with padded groups, with the merged and processed tokens recomputed in backward, and
    where the mixing weights need no gradient."""
    config = kernel_config(mot_recompute=case == "recompute", mot_routing="uniform" if case == "uniform" else "softmax")
    layer = random_layer(config)
    batch = 20 if case == "padded" else 32  # 20: a second group of 4 real rows and 12 of padding
    x = torch.randn(batch, 3, 64, generator=torch.Generator().manual_seed(1)).bfloat16().requires_grad_()
    token_mask = torch.ones(batch, 3, dtype=torch.bool)
    token_mask[0, 1] = False
    results = {}
    for expert_major_layout in (None, True):  # None: the layer's choice, the kernels; True: the batched matmuls
        layer.expert_major_layout = expert_major_layout
        output = layer(x, token_mask if case == "padded" else None)
        parameters = [parameter for parameter in layer.parameters() if parameter.requires_grad]
        grads = torch.autograd.grad(output.float().square().sum(), [x, *parameters], allow_unused=True)
        results[expert_major_layout] = output, grads
        uses_kernels = "EmitWithKernelsBackward" in graph_nodes(output)
        if case != "recompute":  # checkpoint hides the recomputed graph
            assert uses_kernels == (expert_major_layout is None)
    (with_kernels, kernel_grads), (plain, plain_grads) = results[None], results[True]
    for actual, expected in zip((with_kernels, *kernel_grads), (plain, *plain_grads), strict=True):
        if expected is None:  # uniform routing: the controller takes no part
            assert actual is None
            continue
        difference = (actual.float() - expected.float()).norm()
        assert difference <= 1e-2 * expected.float().norm(), difference


def test_layer_does_not_take_the_kernels_where_they_do_not_apply(kernels):
    layer = random_layer(kernel_config())
    x = torch.randn(32, 2, 64).bfloat16()
    mixing, tokens = torch.zeros(2, 16, 256, dtype=torch.bfloat16), torch.zeros(2, 16, 64, dtype=torch.bfloat16)
    assert layer.compiled_mixing_kernels(mixing, tokens) is kernels
    assert "EmitWithKernelsBackward" not in graph_nodes(layer.float()(x.float().requires_grad_()))  # fp32: oneDNN/MKL
    narrow = random_layer(kernel_config(group_size=4, num_experts=64))  # G = 4: the batched matmuls
    assert "EmitWithKernelsBackward" not in graph_nodes(narrow(x.requires_grad_()))


@pytest.mark.parametrize("precision", ["bf16", "autocast"])
def test_experts_take_the_product_kernels_and_give_bmm_outputs_and_gradients(kernels, precision):
    """With products the kernels take (d = f = 64, an even number of positions), the experts run them, forward and
    backward, in bf16 and under bf16 autocast (fp32 weights cast as autocast's bmm casts them); the outputs and every
    gradient agree with the layer's without any kernels."""
    layer = random_layer(kernel_config(num_experts=32, expert_size=64))
    if precision == "autocast":
        layer = layer.float()
    x = torch.randn(32, 3, 64, generator=torch.Generator().manual_seed(1))
    x = (x if precision == "autocast" else x.bfloat16()).requires_grad_()
    results = {}
    for kernels_on in (True, False):
        layer.expert_major_layout = None if kernels_on else True
        layer.experts.product_kernels = MoTExperts.product_kernels if kernels_on else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
            output = layer(x)
        grads = torch.autograd.grad(output.float().square().sum(), [x, *layer.parameters()])
        results[kernels_on] = output, grads
        assert ("ExpertProductsWithKernelsBackward" in graph_nodes(output)) == kernels_on
    for actual, expected in zip((results[True][0], *results[True][1]), (results[False][0], *results[False][1]),
                                strict=True):
        difference = (actual.float() - expected.float()).norm()
        assert difference <= 1e-2 * expected.float().norm(), difference


def test_experts_do_not_take_the_product_kernels_where_they_do_not_apply(kernels):
    layer = random_layer(kernel_config(num_experts=32, expert_size=64))
    assert "ExpertProductsWithKernelsBackward" in graph_nodes(layer(torch.randn(32, 2, 64).bfloat16().requires_grad_()))
    odd_positions = torch.randn(16, 3, 64).bfloat16().requires_grad_()  # one group of 3 positions: M = 3
    assert "ExpertProductsWithKernelsBackward" not in graph_nodes(layer(odd_positions))
    fp32 = layer.float()(torch.randn(32, 2, 64, requires_grad=True))
    assert "ExpertProductsWithKernelsBackward" not in graph_nodes(fp32)
    narrow = random_layer(kernel_config(num_experts=32, expert_size=8))  # f = 8: not a multiple of 64
    assert "ExpertProductsWithKernelsBackward" not in graph_nodes(narrow(torch.randn(32, 2, 64).bfloat16()
                                                                         .requires_grad_()))


def test_kernels_refuse_a_double_backward_with_a_clear_error(kernels):
    layer = random_layer(kernel_config())
    x = torch.randn(32, 2, 64).bfloat16().requires_grad_()
    (grad,) = torch.autograd.grad(layer(x).float().square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward"):
        grad.float().sum().backward()


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


LAYER_RUNS = """
    import torch
    from mixture_of_tokens import MoTConfig, cpu_kernels
    from mixture_of_tokens.modeling.modeling_mot import MixtureOfTokens
    config = MoTConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, group_size=16, num_experts=32,
                       expert_size=8, num_hidden_layers=1, mlp_types=["mot"])
    layer = MixtureOfTokens(config)
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    layer = layer.bfloat16()
    x = torch.randn(16, 2, 64, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    print("kernels:", cpu_kernels.load_kernels() is not None)
"""


def test_mot_cpu_kernels_0_turns_them_off():
    result = run_python(LAYER_RUNS, MOT_CPU_KERNELS="0")
    assert result.returncode == 0, result.stderr
    assert "kernels: False" in result.stdout
    assert "Building" not in result.stderr and "Could not build" not in result.stderr


def test_a_failed_build_warns_once_and_the_layer_runs_the_batched_matmuls(tmp_path):
    if not cpu_kernels.cpu_runs_kernels():
        pytest.skip("this CPU does not run the kernels: nothing is built")
    # A compiler that does not exist, in an empty extensions folder: the build must fail.
    result = run_python(LAYER_RUNS, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    assert result.returncode == 0, result.stderr
    assert "kernels: False" in result.stdout
    assert result.stderr.count("Could not build MoT's CPU kernels") == 1, result.stderr
    assert "MOT_CPU_KERNELS=0 skips this attempt" in result.stderr


@pytest.mark.slow
def test_compiled_layer_runs_the_batched_matmuls_with_fullgraph_and_agrees_with_the_kernels(kernels):
    """Dynamo cannot trace the kernels: under `torch.compile(fullgraph=True)` the layer takes its batched matmuls and
    bmm for the experts, with the eager kernels' outputs and gradients."""
    layer = random_layer(kernel_config(num_experts=32, expert_size=64))
    x = torch.randn(32, 2, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    runs = []
    for run in (layer, torch.compile(layer, fullgraph=True)):
        inputs = x.clone().requires_grad_()
        output = run(inputs)
        runs.append((output, *torch.autograd.grad(output.float().square().sum(), [inputs, *layer.parameters()])))
    torch._dynamo.reset()
    assert {"EmitWithKernelsBackward", "ExpertProductsWithKernelsBackward"} <= graph_nodes(runs[0][0])
    for eager, compiled in zip(*runs, strict=True):
        assert (compiled.float() - eager.float()).norm() <= 1e-2 * eager.float().norm()
