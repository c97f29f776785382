"""Where a feed-forward layer's forward+backward time goes.

    python bench/profile_layer.py --types dense mot            # bf16 weights, the sizes of bench/layer.py
    python bench/profile_layer.py --types mot --precision bf16_autocast
    python bench/profile_layer.py --kernels --variant 32e-16    # each product alone, with its GFLOP/s
    python bench/profile_layer.py --variant 32e-16 --precision fp32   # a granular variant (MoT/32E/16)

First a wall-clock breakdown of MoT (timed like `bench/layer.py`, interleaved, median): the benchmark's own loss
alone (an identity layer), MoT's mixing alone (experts replaced by an identity), the whole MoT layer and dense.
Then torch.profiler's operator table for each of `--types`, grouped by input shape (the profiler adds overhead,
so its totals exceed the wall clock), with each matmul's rate in GFLOP/s beside dense's. Same layers, inputs and
loss as `bench/layer.py` and, on CPU, the same retained-memory allocator setting; times are per step.

`--kernels` instead times every product of the dense FFN's and of MoT's forward and backward alone, at the same
sizes and in the precision's matmul dtype, with its GFLOP/s: the experts', the mixing's (controller, merge, emit) and
the layout passes MoT makes where the batched matmuls copy strided operands (CPU bf16), or, where the layer runs
them (CPU bf16 on an AVX512-BF16 CPU), the package's compiled merge and emit (cpu_kernels.py), which need no layout
passes, and its compiled expert products; `--batched_matmuls` times the batched matmuls there too. The sums of each
part over the dense FFN's six products say what the layer costs before anything between the kernels.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from layer import FFN_TYPES, PRECISIONS, VARIANTS, build_layer, interleaved_medians, matmul_dtype, time_step
from torch.profiler import profile

from mixture_of_tokens import MoTConfig, cpu_kernels
from mixture_of_tokens.modeling.performance_mot import batched_matmul_copies_views
from mixture_of_tokens.training.cpu_memory import retain_freed_cpu_memory


class LossOnly(torch.nn.Module):
    """An identity layer: timing it measures only the benchmark's own loss and its backward."""

    def forward(self, hidden_states):
        return hidden_states * 1.0


def run_step(layer, inputs, autocast_dtype, device) -> None:
    time_step(layer, inputs, autocast_dtype, device)
    layer.zero_grad(set_to_none=True)
    inputs.grad = None


def print_breakdown(config: MoTConfig, inputs, autocast_dtype, args) -> None:
    torch.manual_seed(0)
    mixing_only = build_layer("mot", config, args.device).to(inputs.dtype)
    mixing_only.experts.process = lambda expert_inputs: expert_inputs * 1.0
    layers = {
        "loss only (identity layer)": LossOnly(),
        "MoT mixing (experts = identity)": mixing_only,
        "MoT": build_layer("mot", config, args.device).to(inputs.dtype),
        "dense": build_layer("dense", config, args.device).to(inputs.dtype),
    }
    seconds = interleaved_medians(layers, inputs, autocast_dtype, args.device, args.steps, args.warmup)
    median = {name: value * 1e3 for name, value in seconds.items()}
    loss = median["loss only (identity layer)"]
    mixing = median["MoT mixing (experts = identity)"] - loss
    print(f"wall-clock breakdown ({args.precision}, {args.device}, median of {args.steps}), ms per step:")
    for name, value in median.items():
        print(f"  {name:<34}{value:8.1f}")
    print(f"  => MoT experts ~{median['MoT'] - loss - mixing:.1f}, MoT mixing ~{mixing:.1f}, "
          f"dense FFN ~{median['dense'] - loss:.1f}, benchmark loss ~{loss:.1f}")


def layer_kernels(config: MoTConfig, tokens: int, dtype: torch.dtype, device: str, expert_major: bool,
                  compiled=None) -> dict:
    """Every product of the dense FFN's and of MoT's forward and backward, alone, at the benchmark's sizes, with
    MoT's layout passes, or with its merge and emit through `compiled` (cpu_kernels's kernels) where given: name ->
    (part, kernel, FLOPs or, for a pass, the bytes it reads and writes)."""
    group_size, experts, hidden = config.group_size, config.num_experts, config.hidden_size
    expert_size, dense_size = config.expert_size, config.intermediate_size
    positions = tokens // group_size

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)

    x, hidden_act, dense_up, dense_down = randn(tokens, hidden), randn(tokens, dense_size), randn(
        hidden, dense_size), randn(dense_size, hidden)
    mixing, group_tokens = randn(positions, group_size, experts), randn(positions, group_size, hidden)  # [p, G, *]
    router = randn(hidden, experts)
    logits_grad = randn(tokens, experts)
    merged, expert_hidden = randn(experts, positions, hidden), randn(experts, positions, expert_size)  # [E, p, *]
    up, down = randn(experts, hidden, expert_size), randn(experts, expert_size, hidden)
    position_major = randn(positions, experts, hidden)  # [p, E, d]
    expert_major_out = torch.empty(experts, positions, hidden, dtype=dtype, device=device)
    dense_flops, expert_flops = 2 * tokens * hidden * dense_size, 2 * experts * positions * hidden * expert_size
    mix_flops, router_flops = 2 * positions * group_size * experts * hidden, 2 * tokens * hidden * experts
    pass_bytes = 2 * position_major.numel() * position_major.element_size()
    kernels = {
        "up x @ W1": ("dense", lambda: x @ dense_up, dense_flops),
        "down h @ W2": ("dense", lambda: hidden_act @ dense_down, dense_flops),
        "grad h = g @ W2^T": ("dense", lambda: x @ dense_down.T, dense_flops),
        "grad x = g_h @ W1^T": ("dense", lambda: hidden_act @ dense_up.T, dense_flops),
        "grad W1 = x^T @ g_h": ("dense", lambda: x.T @ hidden_act, dense_flops),
        "grad W2 = h^T @ g": ("dense", lambda: hidden_act.T @ x, dense_flops),
        "experts up [E,p,d] @ [E,d,f]": ("experts", lambda: torch.bmm(merged, up), expert_flops),
        "experts down [E,p,f] @ [E,f,d]": ("experts", lambda: torch.bmm(expert_hidden, down), expert_flops),
        "experts grad h": ("experts", lambda: torch.bmm(merged, down.transpose(1, 2)), expert_flops),
        "experts grad input": ("experts", lambda: torch.bmm(expert_hidden, up.transpose(1, 2)), expert_flops),
        "experts grad W1": ("experts", lambda: torch.bmm(merged.transpose(1, 2), expert_hidden), expert_flops),
        "experts grad W2": ("experts", lambda: torch.bmm(expert_hidden.transpose(1, 2), merged), expert_flops),
        "router x @ W_c": ("mixing", lambda: x @ router, router_flops),
        "router grad x": ("mixing", lambda: logits_grad @ router.T, router_flops),
        "router grad W_c": ("mixing", lambda: x.T @ logits_grad, router_flops),
        "merge [p,E,G] @ [p,G,d]": ("mixing", lambda: torch.bmm(mixing.transpose(1, 2), group_tokens), mix_flops),
        "emit [p,G,E] @ [p,E,d]": ("mixing", lambda: torch.bmm(mixing, position_major), mix_flops),
        "emit grad weights": ("mixing", lambda: torch.bmm(group_tokens, position_major.transpose(1, 2)), mix_flops),
        "emit grad processed": ("mixing", lambda: torch.bmm(mixing.transpose(1, 2), group_tokens), mix_flops),
        "merge grad weights": ("mixing", lambda: torch.bmm(group_tokens, position_major.transpose(1, 2)), mix_flops),
        "merge grad tokens": ("mixing", lambda: torch.bmm(mixing, position_major), mix_flops),
    }
    if compiled is not None:  # MergeWithKernels / EmitWithKernels: the calls the layer makes, no layout passes
        for name in ("merge [p,E,G] @ [p,G,d]", "emit [p,G,E] @ [p,E,d]", "emit grad weights", "emit grad processed",
                     "merge grad weights", "merge grad tokens"):
            del kernels[name]
        kernels.update({
            "compiled merge -> [E,p,d]": ("mixing", lambda: compiled.merge(mixing, group_tokens), mix_flops),
            "compiled emit <- [E,p,d]": ("mixing", lambda: compiled.emit(mixing, merged), mix_flops),
            "compiled emit grad weights (dots)": ("mixing", lambda: compiled.dots(mixing, group_tokens, merged),
                                                  mix_flops),
            "compiled emit grad processed (merge)": ("mixing", lambda: compiled.merge(mixing, group_tokens),
                                                     mix_flops),
            "compiled merge grad (emit and dots)": ("mixing", lambda: compiled.emit_and_dots(
                mixing, merged, group_tokens), 2 * mix_flops),
        })
        if cpu_kernels.products_fit(merged, up):  # ExpertProductsWithKernels: the same six products
            products = compiled.expert_products
            kernels.update({
                "experts up [E,p,d] @ [E,d,f]": ("experts", lambda: products(merged, up), expert_flops),
                "experts down [E,p,f] @ [E,f,d]": ("experts", lambda: products(expert_hidden, down), expert_flops),
                "experts grad h": ("experts", lambda: products(merged, down.transpose(1, 2)), expert_flops),
                "experts grad input": ("experts", lambda: products(expert_hidden, up.transpose(1, 2)), expert_flops),
                "experts grad W1": ("experts", lambda: products(merged.transpose(1, 2), expert_hidden), expert_flops),
                "experts grad W2": ("experts", lambda: products(expert_hidden.transpose(1, 2), merged), expert_flops),
            })
    elif expert_major:  # MergeExpertMajor / EmitExpertMajor: two strided writes, two copies
        into_expert_major = expert_major_out.transpose(0, 1)
        kernels.update({
            "merge written into [E,p,d] (extra)": ("layout", lambda: torch.bmm(
                mixing.transpose(1, 2), group_tokens, out=into_expert_major), -1),
            "copy [E,p,d] -> [p,E,d] (emit)": ("layout", lambda: merged.transpose(0, 1).contiguous(), pass_bytes),
            "copy [E,p,d] -> [p,E,d] (merge grad)": ("layout", lambda: merged.transpose(0, 1).contiguous(),
                                                     pass_bytes),
            "emit grad written into [E,p,d] (extra)": ("layout", lambda: torch.bmm(
                mixing.transpose(1, 2), group_tokens, out=into_expert_major), -1),
        })
    return kernels


def print_kernels(config: MoTConfig, args) -> None:
    """Time each product of the dense FFN's and MoT's forward and backward alone (interleaved rounds, median),
    with its rate, and the sums of each part against the dense FFN's."""
    dtype = matmul_dtype(args.precision)
    tokens = args.batch * args.seq
    probe = torch.empty(0, dtype=dtype, device=args.device)
    expert_major = batched_matmul_copies_views(probe)
    # The compiled merge and emit where the layer runs them here (cpu_kernels.py decides, as for the layer)
    mixing = torch.empty(0, config.group_size, config.num_experts, dtype=dtype, device=args.device)  # [p, G, E]
    group_tokens = torch.empty(0, config.group_size, config.hidden_size, dtype=dtype, device=args.device)  # [p, G, d]
    compiled = None if args.batched_matmuls else cpu_kernels.kernels_for(mixing, group_tokens)
    kernels = layer_kernels(config, tokens, dtype, args.device, expert_major, compiled)
    kernels["copy 128 MiB (the memory bandwidth)"] = ("", (lambda big: lambda: big.clone())(
        torch.empty(2**27 // probe.element_size(), dtype=dtype, device=args.device)), 2**28)

    def synchronize():  # CUDA kernels run asynchronously: wait for them before reading the clock
        if args.device == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {name: [] for name in kernels}
    for round_index in range(args.warmup + args.steps):
        for name, (_, kernel, _) in kernels.items():
            synchronize()
            start = time.perf_counter()
            kernel()
            synchronize()
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    # A strided write's extra: the product into the strided view less the same product into fresh memory.
    plain = {"merge written into [E,p,d] (extra)": "merge [p,E,G] @ [p,G,d]",
             "emit grad written into [E,p,d] (extra)": "emit grad processed"}
    for name, product in plain.items():
        if name in median:
            median[name] = max(0.0, median[name] - median[product])
    print(f"single kernels of the dense FFN and {config.num_experts} experts of {config.expert_size} "
          f"({args.precision}: {str(dtype).removeprefix('torch.')} matmuls, {tokens} tokens, {args.device}, median "
          f"of {args.steps}; MoT's merge, emit and expert products: " + ("compiled kernels" if compiled is not None else
          "batched matmuls, " + ("expert-major copies" if expert_major else "transposed views")) + "):")
    print(f"  {'kernel':<42}{'part':>9}{'ms':>9}{'GFLOP/s':>9}{'GB/s':>7}")
    for name, (part, _, amount) in kernels.items():
        seconds = median[name]
        rate = f"{amount / seconds / 1e9:>9.0f}{'':>7}" if part in ("dense", "experts", "mixing") else (
            f"{'':>9}{amount / seconds / 1e9:>7.1f}" if amount > 0 and seconds > 0 else f"{'':>16}")
        print(f"  {name:<42}{part:>9}{seconds * 1e3:>9.2f}{rate}")
    sums = {part: sum(median[name] for name, (kind, _, _) in kernels.items() if kind == part)
            for part in ("dense", "experts", "mixing", "layout")}
    mot = sums["experts"] + sums["mixing"] + sums["layout"]
    print("  sums over the dense FFN's six products: " + ", ".join(
        f"{part} {value / sums['dense']:.2f}" for part, value in sums.items()) + f"; MoT {mot / sums['dense']:.2f}")


def matmul_flops(name: str, shapes: list) -> int:
    """FLOPs of one call of a matmul operator from its recorded input shapes (0 for anything else)."""
    if name not in ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"):
        return 0
    first, second = [shape for shape in shapes if len(shape) in (2, 3)][-2:]  # after add*'s input, if any
    batch = first[0] if len(first) == 3 else 1
    return 2 * batch * first[-2] * first[-1] * second[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", choices=FFN_TYPES, default=["dense", "mot"])
    parser.add_argument("--precision", choices=list(PRECISIONS), default="bf16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15, help="operators shown per layer type")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--variant", choices=list(VARIANTS), default="32e",
                        help="the MoT variant (bench/layer.py's presets); dense stays the flop-matched FFN")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--system_malloc", action="store_true", help="leave glibc malloc as it is")
    parser.add_argument("--kernels", action="store_true",
                        help="time every product of the layer's forward and backward alone instead")
    parser.add_argument("--batched_matmuls", action="store_true",
                        help="with --kernels: time MoT's merge, emit and expert products as batched matmuls even "
                             "where the layer runs the compiled kernels (the comparison)")
    args = parser.parse_args()
    if args.device == "cpu" and not args.system_malloc:
        retain_freed_cpu_memory()
    dtype, autocast_dtype = PRECISIONS[args.precision]
    config = MoTConfig.from_preset(VARIANTS[args.variant][0])
    if args.kernels:
        print_kernels(config, args)
        return
    inputs = torch.randn(args.batch, args.seq, config.hidden_size, device=args.device, dtype=dtype,
                         requires_grad=True)

    print_breakdown(config, inputs, autocast_dtype, args)
    for ffn_type in args.types:
        torch.manual_seed(0)
        layer = build_layer(ffn_type, config, args.device).to(dtype)

        for _ in range(args.warmup):
            run_step(layer, inputs, autocast_dtype, args.device)
        with profile(record_shapes=True) as profiler:
            for _ in range(args.steps):
                run_step(layer, inputs, autocast_dtype, args.device)
        events = profiler.key_averages(group_by_input_shape=True)
        total = sum(event.self_cpu_time_total for event in events) / args.steps / 1e3
        print(f"\n{ffn_type} ({args.precision}, {args.device}): {total:.1f} ms of operator time per step")
        print(f"{'operator':<34}{'ms/step':>9}{'calls':>7}{'GFLOP/s':>9}  input shapes")
        for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
            shapes = ", ".join(str(shape) for shape in event.input_shapes if shape)
            flops = matmul_flops(event.key, event.input_shapes) * event.count
            rate = f"{flops / event.self_cpu_time_total / 1e3:>9.0f}" if flops else " " * 9
            print(f"{event.key[:33]:<34}{event.self_cpu_time_total / args.steps / 1e3:>9.2f}"
                  f"{event.count // args.steps:>7}{rate}  {shapes[:70]}")


if __name__ == "__main__":
    main()
