"""Where a feed-forward layer's forward+backward time goes.

    python bench/profile_layer.py --types dense mot            # bf16 weights, the sizes of bench/layer.py
    python bench/profile_layer.py --types mot --precision bf16_autocast
    python bench/profile_layer.py --kernels                     # single kernels against the memory bandwidth
    python bench/profile_layer.py --variant 32e-16 --precision fp32   # a granular variant (MoT/32E/16)

First a wall-clock breakdown of MoT (timed like `bench/layer.py`, interleaved, median): the benchmark's own loss
alone (an identity layer), MoT's mixing alone (experts replaced by an identity), the whole MoT layer and dense.
Then torch.profiler's operator table for each of `--types`, grouped by input shape (the profiler adds overhead,
so its totals exceed the wall clock), with each matmul's rate in GFLOP/s beside dense's. Same layers, inputs and
loss as `bench/layer.py` and, on CPU, the same retained-memory allocator setting; times are per step.

`--kernels` instead times the layer's single kernels at the same sizes, each with the bytes it must read and
write: the memory bandwidth (a 128 MiB copy), every pass of MoT's mixing, and the expert matmuls with their
weight operand contiguous along the contracted dimension or not (oneDNN's bf16 kernels are faster when it is).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from layer import FFN_TYPES, PRECISIONS, VARIANTS, build_layer, interleaved_medians, time_step
from torch.profiler import profile

from mixture_of_tokens import MoTConfig
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


def print_kernels(config: MoTConfig, args) -> None:
    """Time each kernel of the layer alone (interleaved rounds, median) and the bandwidth it reaches."""
    dtype = torch.bfloat16
    group_size, num_experts, hidden, expert_size = (config.group_size, config.num_experts, config.hidden_size,
                                                    config.expert_size)
    tokens = 32 * 256
    positions = tokens // group_size

    def synchronize():  # CUDA kernels run asynchronously: wait for them before reading the clock
        if args.device == "cuda":
            torch.cuda.synchronize()

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=args.device)

    def transposed(*shape):  # a [..., a, b] view whose storage is [..., b, a]
        return randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)

    big = randn(64 * 2**20)
    token_major = randn(1, group_size, 256, hidden)  # [n, G, S, d]
    position_major = randn(positions, num_experts, hidden)  # [p, E, d]
    weights = randn(positions, group_size, num_experts)  # [p, G, E]
    group_tokens = randn(positions, group_size, hidden)  # [p, G, d]
    flat_tokens, router = randn(tokens, hidden), randn(hidden, num_experts)
    expert_inputs = randn(num_experts, positions, hidden)  # [E, p, d]
    expert_w1, expert_w1_t = randn(num_experts, hidden, expert_size), transposed(num_experts, hidden, expert_size)
    dense_w, dense_w_t = randn(hidden, expert_size), transposed(hidden, expert_size)
    activation = 2 * tokens * hidden  # bytes of one [tokens, d] bf16 activation
    expert_weight = 2 * num_experts * hidden * expert_size
    # name -> (kernel, bytes it must read and write at least)
    kernels = {
        "copy 128 MiB (memory bandwidth)": (lambda: big.clone(), 2 * big.numel() * 2),
        "layout copy [n,G,S,d] -> [n,S,G,d]": (lambda: token_major.transpose(1, 2).contiguous(), 2 * activation),
        "layout copy [p,E,d] -> [E,p,d]": (lambda: position_major.transpose(0, 1).contiguous(), 2 * activation),
        "merge bmm [p,E,G] @ [p,G,d]": (lambda: torch.bmm(weights.transpose(1, 2), group_tokens), 2 * activation),
        "emit bmm [p,G,E] @ [p,E,d]": (lambda: torch.bmm(weights, position_major), 2 * activation),
        "router mm [N,d] @ [d,E]": (lambda: flat_tokens @ router, activation),
        "expert bmm, weight [E,d,f] as stored": (lambda: torch.bmm(expert_inputs, expert_w1),
                                                 activation + expert_weight + 4 * activation),
        "expert bmm, weight d-contiguous": (lambda: torch.bmm(expert_inputs, expert_w1_t),
                                            activation + expert_weight + 4 * activation),
        "dense mm [N,d] @ [d,f]": (lambda: flat_tokens @ dense_w, 5 * activation),
        "dense mm, weight d-contiguous": (lambda: flat_tokens @ dense_w_t, 5 * activation),
    }
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for round_index in range(args.warmup + 4 * args.steps):
        for name, (kernel, _) in kernels.items():
            synchronize()
            start = time.perf_counter()
            kernel()
            synchronize()
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)
    print(f"single kernels (bf16, {args.device}, median of {4 * args.steps}); GB/s = the bytes each must read "
          "and write / its time:")
    print(f"  {'kernel':<40}{'ms':>8}{'GB/s':>8}")
    for name, (_, nbytes) in kernels.items():
        seconds = statistics.median(times[name])
        print(f"  {name:<40}{seconds * 1e3:8.2f}{nbytes / seconds / 1e9:8.1f}")


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
                        help="time the layer's single kernels against the memory bandwidth instead (bf16)")
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
