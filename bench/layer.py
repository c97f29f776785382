"""Forward+backward time of each feed-forward type at equal FLOPs per token (the paper's Medium sizes).

    python bench/layer.py --out bench/results/layer.json

Dense: d=512, d_ff=2048. MoT: G=32, E=32, f=2048 (flop-matched: E*f/G = d_ff). Token Choice and Expert Choice
use the same E and f with one expert per token. Input: 32 x 256 tokens. The types are timed in interleaved
rounds and the median of each is reported, so a background load slows all of them alike and the ratios stay
meaningful on a shared machine.

Alongside, the naive reference of the MoT layer (mixture_of_tokens/reference.py: the paper's equations as loops)
runs on the first `--reference_positions` positions of the input: its forward time and its largest difference from
the layer's output are reported, so the fast layer is shown to compute the method.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from mixture_of_tokens import MoTConfig
from mixture_of_tokens.cpu_memory import retain_freed_cpu_memory
from mixture_of_tokens.modeling_mot import FEED_FORWARD_CLASSES, MoTPreTrainedModel
from mixture_of_tokens.reference import mixture_of_tokens_reference

FFN_TYPES = ["dense", "mot", "token_choice", "expert_choice"]


def build_layer(ffn_type: str, config: MoTConfig, device: str) -> torch.nn.Module:
    layer = FEED_FORWARD_CLASSES[ffn_type](config)
    # Initialise as the model does (truncated normal, std sqrt(0.1 / fan_in)).
    initialiser = MoTPreTrainedModel.__new__(MoTPreTrainedModel)
    initialiser.config = config
    for module in layer.modules():
        initialiser._init_weights(module)
    return layer.to(device).train()


def time_step(layer, inputs, autocast_dtype, device) -> float:
    autocast = torch.autocast(device_type=device, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast:
        output = layer(inputs)[0]  # every feed-forward layer returns its output first
    output.float().square().mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_medians(layers: dict, inputs, autocast_dtype, device, rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per forward+backward of each layer, timed in interleaved rounds (a background load then
    slows all of them alike); gradients are cleared after every step."""
    times: dict[str, list[float]] = {name: [] for name in layers}
    for round_index in range(warmup + rounds):
        for name, layer in layers.items():
            elapsed = time_step(layer, inputs, autocast_dtype, device)
            layer.zero_grad(set_to_none=True)
            inputs.grad = None
            if round_index >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


# label -> (dtype of weights and inputs, autocast dtype)
PRECISIONS = {
    "bf16": (torch.bfloat16, None),  # weights in bf16: the paper's bf16-only setting (`mot train --bf16_weights`)
    "bf16_autocast": (torch.float32, torch.bfloat16),  # fp32 master weights, bf16 matmuls (`mot train --bf16`)
    "fp32": (torch.float32, None),
}


def benchmark(precision: str, rounds: int, warmup: int, device: str, batch: int, seq: int) -> dict[str, float]:
    dtype, autocast_dtype = PRECISIONS[precision]
    config = MoTConfig.from_preset("mot-medium-32e")
    layers = {name: build_layer(name, config, device).to(dtype) for name in FFN_TYPES}
    inputs = torch.randn(batch, seq, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    return interleaved_medians(layers, inputs, autocast_dtype, device, rounds, warmup)


def compare_with_reference(positions: int, batch: int, device: str) -> dict[str, float]:
    """The MoT layer against its naive reference on `batch x positions` fp32 tokens: forward seconds of each and
    the largest absolute difference of their outputs."""
    config = MoTConfig.from_preset("mot-medium-32e")
    layer = build_layer("mot", config, device).eval()
    inputs = torch.randn(batch, positions, config.hidden_size, device=device)
    with torch.no_grad():
        start = time.perf_counter()
        fast = layer(inputs)[0]
        layer_seconds = time.perf_counter() - start
        start = time.perf_counter()
        slow = mixture_of_tokens_reference(layer, inputs)
        reference_seconds = time.perf_counter() - start
    return {"positions": positions, "batch": batch, "layer_forward_seconds": layer_seconds,
            "reference_forward_seconds": reference_seconds, "max_abs_difference": (fast - slow).abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/layer.json", help="where to write the JSON results")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--system_malloc", action="store_true",
                        help="leave glibc malloc as it is (by default freed memory is kept for reuse, as `mot train` "
                             "does on CPU; see mixture_of_tokens/cpu_memory.py)")
    parser.add_argument("--reference_positions", type=int, default=4,
                        help="positions of the input the naive reference runs on (0: skip it)")
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    args = parser.parse_args()
    torch.manual_seed(0)
    retained = args.device == "cpu" and not args.system_malloc and retain_freed_cpu_memory()

    results: dict = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tokens": args.batch * args.seq,
        "rounds": args.rounds,
        "retain_freed_cpu_memory": retained,
        "seconds": {},
    }
    print(f"feed-forward forward+backward, {args.batch}x{args.seq} tokens, d=512, d_ff=2048, G=32, E=32, f=2048, "
          f"{args.device}, {results['threads']} threads (median of {args.rounds}), freed memory retained: {retained}")
    for label in args.precisions:
        results["seconds"][label] = benchmark(label, args.rounds, args.warmup, args.device, args.batch, args.seq)
    types = list(results["seconds"][args.precisions[0]])
    print(f"{'type':<20}" + "".join(f"{label + ' ms':>20}{'x dense':>9}" for label in args.precisions))
    for name in types:
        row = f"{name:<20}"
        for label in args.precisions:
            seconds = results["seconds"][label]
            row += f"{seconds[name] * 1e3:>20.1f}{seconds[name] / seconds['dense']:>9.2f}"
        print(row)
    for label in args.precisions:
        seconds = results["seconds"][label]
        for name in types[1:]:
            results[f"{name}_over_dense_{label}"] = seconds[name] / seconds["dense"]
    for label in args.precisions:
        print(f"mot_over_dense_{label} = {results[f'mot_over_dense_{label}']:.3f}")
    if args.reference_positions:
        reference = compare_with_reference(args.reference_positions, args.batch, args.device)
        results["reference"] = reference
        print(f"naive reference, {args.batch}x{reference['positions']} tokens, fp32 forward: "
              f"{reference['reference_forward_seconds'] * 1e3:.0f} ms vs the layer's "
              f"{reference['layer_forward_seconds'] * 1e3:.1f} ms, largest difference "
              f"{reference['max_abs_difference']:.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
