"""Forward+backward time of each feed-forward type at equal FLOPs per token (the paper's Medium sizes), with the
paper's granular MoT variants beside their flop-matched dense FFN.

    python bench/layer.py --out bench/results/layer.json
    python bench/layer.py --variants 32e-16 --precisions bf16 --no-routed   # one variant, MoT rows only

Dense: d=512, d_ff=2048. MoT (`--variants`, default all three; flop-matched, E*f/G = d_ff, G = 32):
32e (MoT/32E: E=32, f=2048), 32e-8 (MoT/32E/8: E=256, f=256), 32e-16 (MoT/32E/16: E=512, f=128); each also with
`mot_recompute=True` (the merged and processed tokens recomputed in backward instead of saved). Token Choice and
Expert Choice (`--routed`, on by default) use 32E's E and f with one expert per token. Input: 32 x 256 tokens. The
rows are timed in interleaved rounds and the median of each is reported, so a background load slows all of them
alike and the ratios stay meaningful on a shared machine. `--compare_layouts` adds each variant with its merged and
processed tokens forced into either layout of the batched matmuls (`MixtureOfTokens.expert_major_layout`: transposed
views, or expert-major copies), so a new device shows which it reads faster; the plain rows take the layer's own
choice, which in CPU bf16 on an AVX512-BF16 CPU is the package's compiled merge and emit and expert products
(cpu_kernels.py); the forced rows run bmm for the experts' products too, so they are the layer without kernels.

Each row also has:
- its FLOP floor over dense (bench/flops.py: matmul FLOPs, forward+backward; `1 + 1.5 E / d_ff` flop-matched,
  so 1.02, 1.19, 1.375), and for recompute rows the floor with the recomputed forward as well;
- its saved-activation memory over dense's (`saved_bytes`, per precision): the bytes of the distinct storages the
  forward leaves for backward, on the same input;
- on CUDA, its peak memory over dense's: `torch.cuda.max_memory_allocated` during one forward+backward, above what
  was allocated before it (gradients included).

Alongside, the naive reference of the MoT layer (mixture_of_tokens/modeling/reference.py: the paper's equations as loops)
runs on the first `--reference_positions` positions of the input for each variant: its forward time and its largest
difference from the layer's output are reported, so the fast layer is shown to compute the method.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from flops import flop_floor  # bench/flops.py (this script's folder is on sys.path)

from mixture_of_tokens import MoTConfig, cpu_kernels
from mixture_of_tokens.modeling import modeling_mot
from mixture_of_tokens.modeling.modeling_mot import FEED_FORWARD_CLASSES, MoTPreTrainedModel
from mixture_of_tokens.modeling.performance_mot import batched_matmul_copies_views
from mixture_of_tokens.modeling.reference import mixture_of_tokens_reference
from mixture_of_tokens.training.cpu_memory import retain_freed_cpu_memory

FFN_TYPES = ["dense", "mot", "token_choice", "expert_choice"]
# --variants name -> (preset, label); the dense and routed rows take BASE_PRESET's sizes.
VARIANTS = {
    "32e": ("mot-medium-32e", "MoT/32E"),
    "32e-8": ("mot-medium-32e-8", "MoT/32E/8"),
    "32e-16": ("mot-medium-32e-16", "MoT/32E/16"),
}
BASE_PRESET = "mot-medium-32e"
# MixtureOfTokens.expert_major_layout of a row: "auto" is what the layer picks for the device and dtype (the compiled
# kernels where they apply); the other two force the batched matmuls in that layout (and bmm for the experts).
LAYOUTS = {"auto": None, "views": False, "expert_major": True}


def build_layer(ffn_type: str, config: MoTConfig, device: str) -> torch.nn.Module:
    layer = FEED_FORWARD_CLASSES[ffn_type](config)
    # Initialise as the model does (truncated normal, std sqrt(0.1 / fan_in)).
    initialiser = MoTPreTrainedModel.__new__(MoTPreTrainedModel)
    initialiser.config = config
    for module in layer.modules():
        initialiser._init_weights(module)
    return layer.to(device).train()


@dataclass
class Row:
    """One row of the table: a feed-forward layer of `ffn_type` built from `config`."""

    key: str  # its name in the JSON
    label: str  # its name in the table
    ffn_type: str
    preset: str  # the preset `config` comes from: rows of one type and preset get the same weights
    config: MoTConfig
    floor: float | None  # FLOP floor over dense (None: not counted for this type)
    recompute_floor: float | None = None  # with mot_recompute's second forward, for recompute rows
    layout: str = "auto"  # MoT's merged and processed tokens: a key of LAYOUTS


def variant_key(variant: str) -> str:
    """JSON name of a variant's MoT row: `mot` for 32E (the name this benchmark always had), `mot_32e_16`, ..."""
    return "mot" if variant == "32e" else f"mot_{variant.replace('-', '_')}"


def table_rows(variants: list[str], routed: bool, compare_layouts: bool = False) -> list[Row]:
    base = MoTConfig.from_preset(BASE_PRESET)
    rows = [Row("dense", "dense", "dense", BASE_PRESET, base, 1.0)]
    for variant in variants:
        preset, label = VARIANTS[variant]
        config = MoTConfig.from_preset(preset)
        floor = flop_floor(config, base.intermediate_size)
        rows.append(Row(variant_key(variant), label, "mot", preset, config, floor))
        if compare_layouts:
            rows += [Row(f"{variant_key(variant)}_{layout}", f"{label} {layout.replace('_', '-')}", "mot", preset,
                         config, floor, layout=layout) for layout in ("views", "expert_major")]
        rows.append(Row(f"{variant_key(variant)}_recompute", f"{label} recompute", "mot", preset,
                        MoTConfig.from_preset(preset, mot_recompute=True), floor,
                        flop_floor(config, base.intermediate_size, recompute=True)))
    if routed:
        rows += [Row("token_choice", "Token Choice 32E", "token_choice", BASE_PRESET, base, None),
                 Row("expert_choice", "Expert Choice 32E", "expert_choice", BASE_PRESET, base, None)]
    return rows


def time_step(layer, inputs, autocast_dtype, device) -> float:
    autocast = torch.autocast(device_type=device, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast:
        output = layer(inputs)
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


def is_weight_copy(tensor: torch.Tensor) -> bool:
    """Whether `tensor` comes from one parameter alone through single-input ops: autocast's low-precision copy of a
    weight, or a view of one."""
    node = tensor.grad_fn
    while node is not None:
        children = [child for child, _ in node.next_functions if child is not None]
        if hasattr(node, "variable"):  # a leaf
            return isinstance(node.variable, torch.nn.Parameter)
        if len(children) != 1:
            return False
        node = children[0]
    return False


@contextmanager
def saved_storages(layer: torch.nn.Module, inputs: torch.Tensor):
    """Record the tensor storages that the forward run inside this context saves for backward: yields a dict
    `storage data_ptr -> nbytes`, filled as the forward runs.

    A pack hook of `torch.autograd.graph.saved_tensors_hooks` records each saved tensor's whole storage (so views
    of one tensor count once), except the parameters, autocast's low-precision copies of them (`is_weight_copy`)
    and the input tensor itself, which the layer's caller holds anyway.

    With recomputation (`mot_recompute`) the region under `torch.utils.checkpoint` saves nothing through these
    hooks (the checkpoint's own hooks take its ops' tensors): its inputs, the tokens and the mixing weights, are
    kept for the recomputation instead, and are already saved by the ops before it (the controller's matmul saves
    the tokens, the softmax its weights). Where they are not, as when autocast runs the softmax in fp32 (CUDA) and
    the region gets a bf16 copy of the weights, that copy is held by the checkpoint alone; so that it counts, the
    MoT layer's `checkpoint` is wrapped while the context is open and records the storages of its tensor
    arguments (once each, like everything here).
    """
    skipped = {parameter.untyped_storage().data_ptr() for parameter in layer.parameters()}
    skipped.add(inputs.untyped_storage().data_ptr())
    storages: dict[int, int] = {}

    def record(tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or isinstance(tensor, torch.nn.Parameter):
            return
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in skipped or pointer in storages:
            return
        if is_weight_copy(tensor):
            return
        storages[pointer] = storage.nbytes()

    def pack(tensor):
        record(tensor)
        return tensor

    original = getattr(modeling_mot, "checkpoint", None)

    def recorded_checkpoint(function, *args, **kwargs):
        for argument in args:
            record(argument)
        return original(function, *args, **kwargs)

    if original is not None:
        modeling_mot.checkpoint = recorded_checkpoint
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield storages
    finally:
        if original is not None:
            modeling_mot.checkpoint = original


def saved_bytes(layer, inputs, autocast_dtype, device) -> int:
    """Bytes of the distinct storages one forward of `layer` on `inputs` saves for backward (see `saved_storages`)."""
    autocast = torch.autocast(device_type=device, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with saved_storages(layer, inputs) as storages, autocast:
        output = layer(inputs)
    del output  # frees the graph and what it saved
    return sum(storages.values())


def peak_memory_bytes(layer, inputs, autocast_dtype, device) -> int | None:
    """CUDA only: the peak allocated memory of one forward+backward above what was allocated before it."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    time_step(layer, inputs, autocast_dtype, device)
    peak = torch.cuda.max_memory_allocated() - before
    layer.zero_grad(set_to_none=True)
    inputs.grad = None
    return peak


# label -> (dtype of weights and inputs, autocast dtype)
PRECISIONS = {
    "bf16": (torch.bfloat16, None),  # weights in bf16: the paper's bf16-only setting (`mot train --bf16_weights`)
    "bf16_autocast": (torch.float32, torch.bfloat16),  # fp32 master weights, bf16 matmuls (`mot train --bf16`)
    "fp32": (torch.float32, None),
}


def matmul_dtype(precision: str) -> torch.dtype:
    """The dtype a precision's matmuls run in: autocast's where it casts, else the weights'."""
    weights_dtype, autocast_dtype = PRECISIONS[precision]
    return autocast_dtype or weights_dtype


def row_layer(row: Row, weights: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The layer of `row` in `dtype` on `device`. Weights are initialised once per type and preset, in fp32 on the
    CPU, and kept in `weights` (initialisation, not timing, dominates a short run): a variant and its recompute row,
    and the layers of every precision, start from the same values."""
    if (row.ffn_type, row.preset) not in weights:
        torch.manual_seed(0)
        weights[row.ffn_type, row.preset] = build_layer(row.ffn_type, MoTConfig.from_preset(row.preset), "cpu")
    layer = FEED_FORWARD_CLASSES[row.ffn_type](row.config)
    layer.load_state_dict(weights[row.ffn_type, row.preset].state_dict())
    if row.ffn_type == "mot":
        layer.expert_major_layout = LAYOUTS[row.layout]
        if LAYOUTS[row.layout] is not None:  # the batched matmuls throughout: the experts' products too
            layer.experts.product_kernels = None
    return layer.to(device=device, dtype=dtype).train()


def benchmark(precision: str, rows: list[Row], weights: dict, rounds: int, warmup: int, device: str, batch: int,
              seq: int) -> dict[str, dict]:
    """Per row: median seconds, saved bytes and (CUDA) peak bytes, in one precision."""
    dtype, autocast_dtype = PRECISIONS[precision]
    layers = {row.key: row_layer(row, weights, device, dtype) for row in rows}
    inputs = torch.randn(batch, seq, rows[0].config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    seconds = interleaved_medians(layers, inputs, autocast_dtype, device, rounds, warmup)
    memory = {key: saved_bytes(layer, inputs, autocast_dtype, device) for key, layer in layers.items()}
    peaks = {key: peak_memory_bytes(layer, inputs, autocast_dtype, device) for key, layer in layers.items()}
    return {"seconds": seconds, "saved_bytes": memory, "peak_bytes": peaks}


def compare_with_reference(row: Row, weights: dict, positions: int, batch: int, device: str) -> dict[str, float]:
    """The MoT layer of `row` against its naive reference on `batch x positions` fp32 tokens: forward seconds of
    each and the largest absolute difference of their outputs."""
    config = row.config
    layer = row_layer(row, weights, device, torch.float32).eval()
    inputs = torch.randn(batch, positions, config.hidden_size, device=device)
    with torch.no_grad():
        start = time.perf_counter()
        fast = layer(inputs)
        layer_seconds = time.perf_counter() - start
        start = time.perf_counter()
        slow = mixture_of_tokens_reference(layer, inputs)
        reference_seconds = time.perf_counter() - start
    return {"preset": row.preset, "positions": positions, "batch": batch, "layer_forward_seconds": layer_seconds,
            "reference_forward_seconds": reference_seconds, "max_abs_difference": (fast - slow).abs().max().item()}


def cpu_description() -> dict:
    """The CPU's model name (/proc/cpuinfo on Linux; `platform.processor()` is often empty there) and whether it
    has native bf16 matmul instructions (x86 flags avx512_bf16 or amx_bf16; aarch64 feature bf16)."""
    name, flags = None, None
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if name is None and key in ("model name", "cpu model", "hardware"):
                    name = value.strip()
                elif flags is None and key in ("flags", "features"):
                    flags = set(value.split())
                if name is not None and flags is not None:
                    break
    except OSError:
        pass
    bf16_flags = sorted((flags or set()) & {"avx512_bf16", "amx_bf16", "bf16"})
    return {"cpu": name or platform.processor() or platform.machine(),
            "cpu_native_bf16": None if flags is None else bool(bf16_flags), "cpu_bf16_flags": bf16_flags}


def auto_mixing(config: MoTConfig, device: str, dtype: torch.dtype) -> str:
    """What the MoT layer's merge and emit run on at `config`'s sizes: "kernels" where the package's compiled ones
    apply (cpu_kernels.py decides, as for the layer), else the layout its batched matmuls take ("expert_major" or
    "views")."""
    mixing = torch.empty(0, config.group_size, config.num_experts, device=device, dtype=dtype)  # [p, G, E]
    tokens = torch.empty(0, config.group_size, config.hidden_size, device=device, dtype=dtype)  # [p, G, d]
    if cpu_kernels.kernels_for(mixing, tokens) is not None:
        return "kernels"
    return "expert_major" if batched_matmul_copies_views(tokens) else "views"


def ratio(value, dense) -> float | None:
    return None if value is None or not dense else value / dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/layer.json", help="where to write the JSON results")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="MoT variants, each with a recompute row (default: all three)")
    parser.add_argument("--routed", action=argparse.BooleanOptionalAction, default=True,
                        help="Token Choice and Expert Choice rows at 32E (default on; --no-routed drops them)")
    parser.add_argument("--system_malloc", action="store_true",
                        help="leave glibc malloc as it is (by default freed memory is kept for reuse, as `mot train` "
                             "does on CPU; see mixture_of_tokens/training/cpu_memory.py)")
    parser.add_argument("--reference_positions", type=int, default=4,
                        help="positions of the input the naive reference runs on, for each variant (0: skip it)")
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--compare_layouts", action="store_true",
                        help="each MoT variant also through batched matmuls with its merged and processed tokens "
                             "forced into either layout (transposed views, expert-major copies); the plain row takes "
                             "the layer's choice (the compiled kernels in CPU bf16 where they run)")
    args = parser.parse_args()
    torch.manual_seed(0)
    retained = args.device == "cpu" and not args.system_malloc and retain_freed_cpu_memory()
    rows = table_rows(args.variants, args.routed, args.compare_layouts)
    base = rows[0].config

    results: dict = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        **cpu_description(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tokens": args.batch * args.seq,
        "rounds": args.rounds,
        "retain_freed_cpu_memory": retained,
        "rows": {row.key: {"label": row.label, "type": row.ffn_type, "group_size": row.config.group_size,
                           "num_experts": row.config.num_experts, "expert_size": row.config.expert_size,
                           "mot_recompute": row.config.mot_recompute, "layout": row.layout, "flop_floor": row.floor,
                           "flop_floor_with_recompute": row.recompute_floor} for row in rows},
        # What the MoT layer's merge and emit run on in each precision on this device (the "auto" rows').
        "auto_layout": {label: auto_mixing(base, args.device, matmul_dtype(label)) for label in args.precisions},
        "seconds": {},
        "saved_bytes": {},
        "peak_bytes": {},
    }
    bf16 = {True: "native bf16", False: "no native bf16", None: "bf16 support unknown"}[results["cpu_native_bf16"]]
    print(f"feed-forward forward+backward, {args.batch}x{args.seq} tokens, d={base.hidden_size}, "
          f"d_ff={base.intermediate_size}, G={base.group_size}, {args.device}, {results['cpu']} ({bf16}), "
          f"{results['threads']} threads (median of {args.rounds}), freed memory retained: {retained}")
    weights: dict = {}
    for label in args.precisions:
        measured = benchmark(label, rows, weights, args.rounds, args.warmup, args.device, args.batch, args.seq)
        for part, values in measured.items():
            results[part][label] = values
    cuda = args.device == "cuda"
    header = f"{'row':<25}{'E':>5}{'f':>6}{'floor':>7}{'+recomp':>8}"
    for label in args.precisions:
        header += f"{label + ' ms':>19}{'x dense':>8}{'saved x':>8}" + (f"{'peak x':>7}" if cuda else "")
    print(header)
    print("-" * len(header))
    for row in rows:
        floor = "" if row.floor is None else f"{row.floor:.3f}"
        recompute_floor = "" if row.recompute_floor is None else f"{row.recompute_floor:.3f}"
        experts = "" if row.ffn_type == "dense" else str(row.config.num_experts)
        width = row.config.intermediate_size if row.ffn_type == "dense" else row.config.expert_size
        line = f"{row.label:<25}{experts:>5}{width:>6}{floor:>7}{recompute_floor:>8}"
        for label in args.precisions:
            seconds, saved, peak = (results[part][label] for part in ("seconds", "saved_bytes", "peak_bytes"))
            line += (f"{seconds[row.key] * 1e3:>19.1f}{seconds[row.key] / seconds['dense']:>8.2f}"
                     f"{ratio(saved[row.key], saved['dense']):>8.2f}")
            if cuda:
                line += f"{ratio(peak[row.key], peak['dense']):>7.2f}"
        print(line)
    print("floor: matmul FLOPs over dense's (bench/flops.py); +recomp: the same with mot_recompute's second forward; "
          "saved x: bytes saved for backward over dense's" + ("; peak x: CUDA peak memory over dense's" if cuda else ""))
    for label in args.precisions:
        seconds, saved, peak = (results[part][label] for part in ("seconds", "saved_bytes", "peak_bytes"))
        for row in rows[1:]:
            results[f"{row.key}_over_dense_{label}"] = seconds[row.key] / seconds["dense"]
            results[f"{row.key}_saved_over_dense_{label}"] = ratio(saved[row.key], saved["dense"])
            if cuda:
                results[f"{row.key}_peak_over_dense_{label}"] = ratio(peak[row.key], peak["dense"])
            floor = row.recompute_floor or row.floor
            if floor:
                results[f"{row.key}_over_floor_{label}"] = seconds[row.key] / seconds["dense"] / floor
    print("MoT's merge and emit here: " + ", ".join(f"{label} {layout}" for label, layout in results["auto_layout"].items()))
    for label in args.precisions:
        print(f"{label}, x dense over the row's floor (+recomp for recompute rows): "
              + ", ".join(f"{row.label} {results[f'{row.key}_over_floor_{label}']:.2f}" for row in rows[1:] if row.floor))
    if args.reference_positions:
        results["reference"] = {}
        for row in rows:
            if row.ffn_type != "mot" or row.config.mot_recompute:
                continue
            reference = compare_with_reference(row, weights, args.reference_positions, args.batch, args.device)
            results["reference"][row.key] = reference
            print(f"naive reference of {row.label}, {args.batch}x{reference['positions']} tokens, fp32 forward: "
                  f"{reference['reference_forward_seconds'] * 1e3:.0f} ms vs the layer's "
                  f"{reference['layer_forward_seconds'] * 1e3:.1f} ms, largest difference "
                  f"{reference['max_abs_difference']:.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
