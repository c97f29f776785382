"""Where a feed-forward layer's forward+backward time goes.

    python bench/profile_layer.py --types dense mot            # bf16 weights, the sizes of bench/layer.py
    python bench/profile_layer.py --types mot --precision bf16_autocast

First a wall-clock breakdown of MoT (timed like `bench/layer.py`, interleaved, median): the benchmark's own loss
alone (an identity layer), MoT's mixing alone (experts replaced by an identity), the whole MoT layer and dense.
Then torch.profiler's operator table for each of `--types`, grouped by input shape (the profiler adds overhead,
so its totals exceed the wall clock). Same layers, inputs and loss as `bench/layer.py` and, on CPU, the same
retained-memory allocator setting; times are per step.
"""

from __future__ import annotations

import argparse

import torch
from layer import FFN_TYPES, PRECISIONS, build_layer, interleaved_medians, time_step
from torch.profiler import profile

from mixture_of_tokens import MoTConfig
from mixture_of_tokens.cpu_memory import retain_freed_cpu_memory


class LossOnly(torch.nn.Module):
    """An identity layer: timing it measures only the benchmark's own loss and its backward."""

    def forward(self, hidden_states):
        return hidden_states * 1.0, None


def run_step(layer, inputs, autocast_dtype, device) -> None:
    time_step(layer, inputs, autocast_dtype, device)
    layer.zero_grad(set_to_none=True)
    inputs.grad = None


def print_breakdown(config: MoTConfig, inputs, autocast_dtype, args) -> None:
    torch.manual_seed(0)
    mixing_only = build_layer("mot", config, args.device).to(inputs.dtype)
    mixing_only.run_experts = lambda expert_inputs: expert_inputs * 1.0
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", choices=FFN_TYPES, default=["dense", "mot"])
    parser.add_argument("--precision", choices=list(PRECISIONS), default="bf16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15, help="operators shown per layer type")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--system_malloc", action="store_true", help="leave glibc malloc as it is")
    args = parser.parse_args()
    if args.device == "cpu" and not args.system_malloc:
        retain_freed_cpu_memory()
    dtype, autocast_dtype = PRECISIONS[args.precision]
    config = MoTConfig.from_preset("mot-medium-32e")
    inputs = torch.randn(32, 256, config.hidden_size, device=args.device, dtype=dtype, requires_grad=True)

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
        print(f"{'operator':<34}{'ms/step':>9}{'calls':>7}  input shapes")
        for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
            shapes = ", ".join(str(shape) for shape in event.input_shapes if shape)
            print(f"{event.key[:33]:<34}{event.self_cpu_time_total / args.steps / 1e3:>9.2f}"
                  f"{event.count // args.steps:>7}  {shapes[:70]}")


if __name__ == "__main__":
    main()
