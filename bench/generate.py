"""Decode speed after transition tuning: what unbatched generation costs with Token Choice.

    python bench/generate.py --preset tiny-mot --out bench/results/generate_tiny.json
    python bench/generate.py --preset mot-medium-32e --new_tokens 32 --out bench/results/generate_medium.json

Three rows (random weights: decode speed does not depend on what the weights are):
- Token Choice, batch 1: the MoT preset converted by `mot convert` (the same tensors; a transition-tuned model has
  exactly this architecture), eval mode, so dropless and batch-independent; one row per experts implementation of
  transformers' interface (`--experts_implementations`: eager, batched_mm, grouped_mm).
- Dense, batch 1: the same model with dense feed-forward layers of width `top_k * expert_size`, i.e. the same
  active parameters per token as Token Choice (the preset must have `intermediate_size == top_k * expert_size`).
- MoT, batch = group_size: the only way MoT generates as trained (full groups); tokens/s counts all sequences.
A dense row at batch = group_size is added for reference.

`--stock_reference` adds transformers' own Qwen2-MoE of the same shape (d, blocks, heads, E, f, top-k, the routed
blocks where the MoT preset has them; a zero-width shared expert) with each experts implementation, and the same
model with every block dense: the cost of transformers' MoE machinery at batch 1 in a model that is not ours.

Decode tokens/s = (new_tokens - 1) * batch / (time to generate new_tokens - time to generate 1 token), so the
prompt's prefill is not counted. Rows are timed in interleaved rounds and the median is reported, so a noisy
shared machine slows all of them alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mixture_of_tokens import MoTConfig, MoTForCausalLM
from mixture_of_tokens.conversion.convert import converted_config


def build_models(preset: str, top_k: int, device: str, implementations=("grouped_mm",),
                 overrides: dict | None = None) -> dict[str, tuple[MoTForCausalLM, int]]:
    """name -> (model, batch size) for every row of the table; one Token Choice row per experts implementation."""
    overrides = overrides or {}
    mot_config = MoTConfig.from_preset(preset, **overrides)
    if "mot" not in mot_config.mlp_types:
        raise SystemExit(f"preset {preset!r} has no MoT layers; choose a MoT preset")
    if mot_config.intermediate_size != top_k * mot_config.expert_size:
        raise SystemExit(
            f"preset {preset!r}: a dense model with the same active parameters needs intermediate_size "
            f"({mot_config.intermediate_size}) == top_k * expert_size ({top_k} * {mot_config.expert_size})"
        )
    torch.manual_seed(0)
    mot = MoTForCausalLM(mot_config)
    # The conversion `mot convert` performs: new config, same tensors.
    rows = {}
    for implementation in implementations:
        token_choice = MoTForCausalLM(converted_config(mot_config, "token_choice", top_k=top_k))
        token_choice.load_state_dict(mot.state_dict())
        token_choice.set_experts_implementation(implementation)  # transformers' experts interface
        rows[f"token_choice [{implementation}], batch 1"] = (token_choice, 1)
    dense_config = MoTConfig.from_preset(preset, **{**overrides, "mlp_types": ["dense"] * mot_config.num_hidden_layers})
    dense = MoTForCausalLM(dense_config)
    group = mot_config.group_size
    rows.update({
        "dense, same active params, batch 1": (dense, 1),
        f"mot, batch {group} (= group size)": (mot, group),
        f"dense, same active params, batch {group}": (dense, group),
    })
    for model, _ in rows.values():
        model.to(device).eval()
    return rows


def build_stock_reference(preset: str, top_k: int, device: str, implementations,
                          overrides: dict | None = None) -> dict[str, tuple[torch.nn.Module, int]]:
    """transformers' Qwen2-MoE shaped like the preset's Token Choice model, and its all-dense twin (batch 1)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = MoTConfig.from_preset(preset, **(overrides or {}))
    blocks = config.num_hidden_layers
    shape = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=blocks,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings, intermediate_size=config.intermediate_size,
        num_experts=config.num_experts, num_experts_per_tok=top_k, moe_intermediate_size=config.expert_size,
        shared_expert_intermediate_size=0, norm_topk_prob=False, decoder_sparse_step=1,
    )
    dense_blocks = [index for index, kind in enumerate(config.mlp_types) if kind == "dense"]
    torch.manual_seed(0)
    rows = {}
    for implementation in implementations:
        moe = Qwen2MoeForCausalLM(Qwen2MoeConfig(**shape, mlp_only_layers=dense_blocks))
        moe.set_experts_implementation(implementation)
        rows[f"stock qwen2_moe [{implementation}], batch 1"] = (moe, 1)
    rows["stock qwen2_moe, every block dense, batch 1"] = (
        Qwen2MoeForCausalLM(Qwen2MoeConfig(**shape, mlp_only_layers=list(range(blocks)))), 1)
    for model, _ in rows.values():
        model.to(device).eval()
    return rows


@torch.no_grad()
def generation_seconds(model, prompt_ids: torch.Tensor, new_tokens: int) -> float:
    """Wall time of greedy generation of exactly `new_tokens` tokens (no early stop at end-of-text)."""
    if prompt_ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    if prompt_ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-mot", help="MoT preset (tiny-mot, mot-medium-32e, ...)")
    parser.add_argument("--top_k", type=int, default=1, help="experts per token of the Token Choice model")
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--experts_implementations", nargs="+", default=["eager", "batched_mm", "grouped_mm"],
                        help="Token Choice rows, one per experts implementation of transformers' interface")
    parser.add_argument("--hidden_size", type=int, default=None, help="override the preset's hidden size")
    parser.add_argument("--stock_reference", action="store_true",
                        help="add transformers' Qwen2-MoE of the same shape and its all-dense twin (batch 1)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.new_tokens < 2:
        raise SystemExit("--new_tokens must be at least 2 (decode speed excludes the first token)")

    overrides = {"hidden_size": args.hidden_size} if args.hidden_size else {}
    rows = build_models(args.preset, args.top_k, args.device, args.experts_implementations, overrides)
    if args.stock_reference:
        rows.update(build_stock_reference(args.preset, args.top_k, args.device, args.experts_implementations,
                                          overrides))
    max_context = next(iter(rows.values()))[0].config.max_position_embeddings
    if args.prompt_len + args.new_tokens > max_context:
        raise SystemExit(f"--prompt_len + --new_tokens must fit the context of {max_context} tokens")
    generator = torch.Generator().manual_seed(0)
    vocab = next(iter(rows.values()))[0].config.vocab_size
    prompts = {name: torch.randint(1, vocab, (batch, args.prompt_len), generator=generator).to(args.device)
               for name, (_, batch) in rows.items()}
    for name, (model, _) in rows.items():  # warm-up: first calls allocate and pick kernels
        generation_seconds(model, prompts[name], 2)

    decode_times: dict[str, list[float]] = {name: [] for name in rows}
    with tqdm(total=args.rounds * len(rows), desc="timing", unit="run") as progress:
        for _ in range(args.rounds):
            for name, (model, _) in rows.items():
                full = generation_seconds(model, prompts[name], args.new_tokens)
                first = generation_seconds(model, prompts[name], 1)
                decode_times[name].append(max(full - first, 1e-9))
                progress.update()

    results = []
    for name, (model, batch) in rows.items():
        seconds = statistics.median(decode_times[name])
        tokens = (args.new_tokens - 1) * batch
        results.append({
            "model": name, "batch": batch, "mlp_types": getattr(model.config, "mlp_types", None),
            "parameters": sum(p.numel() for p in model.parameters()),
            "decode_tokens_per_s": tokens / seconds,
            "decode_tokens_per_s_per_sequence": tokens / seconds / batch,
            "decode_seconds_median": seconds,
        })
    report = {
        "preset": args.preset, "top_k": args.top_k, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "rounds": args.rounds, "device": args.device, "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
        "results": results,
    }
    width = max(len(r["model"]) for r in results)
    print(f"\npreset {args.preset}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"device {args.device}, median of {args.rounds}")
    print(f"{'model'.ljust(width)}  {'params':>8}  {'tok/s':>9}  {'tok/s/seq':>9}")
    for r in results:
        print(f"{r['model'].ljust(width)}  {r['parameters'] / 1e6:7.1f}M  {r['decode_tokens_per_s']:9.1f}  "
              f"{r['decode_tokens_per_s_per_sequence']:9.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
