"""Training throughput (tokens/s) of MoT vs its dense baseline, through the same Trainer that `mot train` uses.

Pairs: tiny-dense vs tiny-mot (flop-matched CPU presets) and transformer-medium vs mot-medium-32e (the paper's).
Every model trains on the same random-token batches (same micro-batch, same sequence length, bf16 autocast by
default), the first `--warmup` optimizer steps are not timed; a model's time per step is the median of its timed
steps. With `--repeats N` the dense and MoT models of a pair are trained alternately N times each and the median is
taken over all their timed steps, so that a busy period of a shared machine does not land on one model only.
Prints a table and writes JSON.

    python bench/train_throughput.py                          # tiny pair + medium pair, small settings
    python bench/train_throughput.py --pairs tiny --steps 20 --batch 32 --seq_len 128
    python bench/train_throughput.py --pairs medium --batch 32 --seq_len 256 --steps 20   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

from mixture_of_tokens import MoTConfig, MoTForCausalLM
from mixture_of_tokens.cpu_memory import retain_freed_cpu_memory
from mixture_of_tokens.data import collate_blocks
from mixture_of_tokens.train import MoTTrainingArguments
from mixture_of_tokens.trainer import MoTTrainer

PAIRS = {"tiny": ("tiny-dense", "tiny-mot"), "medium": ("transformer-medium", "mot-medium-32e")}


class StepClock(TrainerCallback):
    """Wall-clock time at the end of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def measure(preset: str, args) -> dict:
    config = MoTConfig.from_preset(preset, max_position_embeddings=max(args.seq_len, 64))
    if args.batch % config.group_size and "mot" in config.mlp_types:
        raise SystemExit(f"--batch {args.batch} must be a multiple of {preset}'s group_size {config.group_size}")
    torch.manual_seed(0)
    model = MoTForCausalLM(config)
    steps = args.warmup + args.steps
    sequences_per_step = args.batch * args.grad_accum
    tokens = torch.randint(0, config.vocab_size, (steps * sequences_per_step, args.seq_len), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": tokens.tolist()})
    clock = StepClock()
    with tempfile.TemporaryDirectory() as scratch:
        training_args = MoTTrainingArguments(
            output_dir=scratch, max_steps=steps, per_device_train_batch_size=args.batch, bf16=args.bf16,
            gradient_accumulation_steps=args.grad_accum,
            eval_strategy="no", save_strategy="no", logging_steps=10**9, report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, warmup_steps=0, seed=0, use_cpu=not torch.cuda.is_available(),
        )
        trainer = MoTTrainer(model=model, args=training_args, train_dataset=data, data_collator=collate_blocks,
                             callbacks=[clock], plots_at_end=False)
        trainer.train()
    timed = clock.times[args.warmup - 1 :] if args.warmup else [clock.times[0]] + clock.times
    return {
        "preset": preset,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_seconds": [later - earlier for earlier, later in zip(timed[:-1], timed[1:], strict=True)],
    }


def summarize(runs: list[dict], args) -> dict:
    """One row from the repeated runs of a preset: the median step time over all their timed steps."""
    step_seconds = [seconds for run in runs for seconds in run["step_seconds"]]
    seconds_per_step = statistics.median(step_seconds)
    return {
        "preset": runs[0]["preset"],
        "parameters": runs[0]["parameters"],
        "timed_steps": len(step_seconds),
        "step_seconds": step_seconds,
        "seconds_per_step": seconds_per_step,
        "tokens_per_second": args.batch * args.grad_accum * args.seq_len / seconds_per_step,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=["tiny", "medium"])
    parser.add_argument("--batch", type=int, default=32, help="micro-batch (a multiple of every group_size)")
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--repeats", type=int, default=1,
                        help="train each model of a pair this many times, alternating (median over all of them)")
    parser.add_argument("--bf16", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                        help="bf16 autocast (default true, as in the paper)")
    parser.add_argument("--json", default="bench/results/train_throughput.json")
    parser.add_argument("--grad_accum", type=int, default=1,
                        help="micro-batches per optimizer step (the paper steps on 256 x 256 tokens)")
    parser.add_argument("--system_malloc", action="store_true",
                        help="leave glibc malloc as it is (by default freed memory is kept for reuse on CPU, as "
                             "`mot train` does)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        parser.error(f"--repeats and --steps must be at least 1, got {args.repeats} and {args.steps}")
    if not torch.cuda.is_available() and not args.system_malloc:
        retain_freed_cpu_memory()

    rows = []
    for pair in args.pairs:
        dense, mot = PAIRS[pair]
        runs: dict[str, list[dict]] = {dense: [], mot: []}
        for _ in range(args.repeats):
            for preset in (dense, mot):
                runs[preset].append(measure(preset, args))
        results = [summarize(runs[dense], args), summarize(runs[mot], args)]
        results[1]["relative_to_dense"] = results[1]["tokens_per_second"] / results[0]["tokens_per_second"]
        rows += results
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    header = f"{'preset':<20} {'params':>10} {'s/step':>9} {'tokens/s':>11} {'vs dense':>9}"
    print(f"training throughput: batch {args.batch} x {args.seq_len} tokens x {args.grad_accum} micro-batches per "
          f"step, bf16 autocast {args.bf16}, {device}")
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = f"{row['relative_to_dense']:.2f}x" if "relative_to_dense" in row else ""
        print(f"{row['preset']:<20} {row['parameters'] / 1e6:>9.1f}M {row['seconds_per_step']:>9.3f} "
              f"{row['tokens_per_second']:>11.0f} {ratio:>9}")
    report = {"settings": vars(args), "device": device, "torch": torch.__version__, "machine": platform.machine(),
              "results": rows}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.partial")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
