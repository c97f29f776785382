"""Training throughput (tokens/s) of MoT vs its dense baseline, through the same Trainer that `mot train` uses.

Pairs: tiny-dense vs tiny-mot (flop-matched CPU presets) and transformer-medium vs mot-medium-32e (the paper's).
Or any presets at once with `--presets` (the paper's granular variants beside their dense partner), each step's
time then relative to the first dense preset of the list. `--mot_recompute` sets `mot_recompute` on the MoT presets
(`both`: each MoT preset with and without it). Every model trains on the same random-token batches (same
micro-batch, same sequence length, bf16 autocast by default), the first `--warmup` optimizer steps are not timed
(default 2: the first step allocates AdamW's moments, and the step after it still faults ~100K fresh pages into
memory at MoT-Medium/32E/16's 295M parameters, ~0.3 s; from the third on a step reuses what the last one freed, as
in a long run); a model's time per step is the median of its timed steps. With `--repeats N` the models of a pair
(or of `--presets`) are trained in turn N times each and the median is taken over all their timed steps, so that a
busy period of a shared machine does not land on one model only. With `--interleaved` the models train in one process,
one optimizer step each in turn, in a plain loop of Trainer's operations (forward and backward of each micro-batch,
gradient clipping, Trainer's own AdamW), and each step is also compared with the dense step of its round: on a
shared machine whose speed drifts over minutes, the median of those per-round ratios is the steadiest figure.

Each row has its step time over the dense model's (`x dense`) and the step's FLOP floor over dense (bench/flops.py:
the matmul FLOPs of forward+backward of the whole model, attention and output head included, so far below the
layer's floor; the optimizer's per-parameter work, which grows with MoT's parameters, is not counted), and the
step's floor with the optimizer (`floor+opt`: the forward and backward at that floor, plus the model's own measured
clipping and optimizer step, over the dense step). At small batches the optimizer is a visible part of a MoT step:
the experts of a flop-matched MoT layer hold G times the dense FFN's parameters (32 in the paper's presets), and no
MoT kernel runs AdamW. Prints a table and writes JSON.

    python bench/train_throughput.py                          # tiny pair + medium pair, small settings
    python bench/train_throughput.py --pairs tiny --steps 20 --batch 32 --seq_len 128
    python bench/train_throughput.py --pairs medium --batch 32 --seq_len 256 --steps 20   # on a GPU
    python bench/train_throughput.py --presets transformer-medium mot-medium-32e mot-medium-32e-8 \
        mot-medium-32e-16 --mot_recompute both --batch 32 --seq_len 256 --steps 5 --repeats 2
    python bench/train_throughput.py --presets transformer-medium mot-medium-32e-16 --bf16 false --bf16_weights \
        --vocab_size 8192 --batch 32 --seq_len 256 --grad_accum 8 --steps 20 --warmup 1 --interleaved  # paper's step
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
from flops import step_flops  # bench/flops.py (this script's folder is on sys.path)
from transformers import TrainerCallback

from mixture_of_tokens import PRESETS, MoTConfig, MoTForCausalLM
from mixture_of_tokens.data import collate_blocks
from mixture_of_tokens.training.cpu_memory import retain_freed_cpu_memory
from mixture_of_tokens.training.train import MoTTrainingArguments
from mixture_of_tokens.training.trainer import MoTTrainer

PAIRS = {"tiny": ("tiny-dense", "tiny-mot"), "medium": ("transformer-medium", "mot-medium-32e")}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock(TrainerCallback):
    """Wall-clock time at the start of the first optimizer step and at the end of every step, and the seconds of
    each `optimizer.step()` (Trainer calls the two hooks around it, after gradient clipping)."""

    def __init__(self):
        self.start: float | None = None
        self.times: list[float] = []
        self.optimizer_start = 0.0
        self.optimizer_seconds: list[float] = []
        self.clip_seconds: list[float] = []

    def time_clipping(self, trainer) -> None:
        """Time Trainer's gradient clipping too (it has no callback around it)."""
        clip = trainer._clip_grad_norm

        def timed_clip(model):
            synchronize()
            start = time.perf_counter()
            norm = clip(model)
            synchronize()
            self.clip_seconds.append(time.perf_counter() - start)
            return norm

        trainer._clip_grad_norm = timed_clip

    def on_step_begin(self, args, state, control, **kwargs):
        if self.start is None:
            synchronize()
            self.start = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        synchronize()
        self.optimizer_start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        synchronize()
        self.optimizer_seconds.append(time.perf_counter() - self.optimizer_start)

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        self.times.append(time.perf_counter())


def is_dense(preset: str) -> bool:
    return set(MoTConfig.from_preset(preset).mlp_types) == {"dense"}


def model_config(preset: str, recompute: bool, args) -> MoTConfig:
    vocabulary = {}
    if args.vocab_size:
        # GPT-2's end-of-text id (50256), the paper's presets' special token, moves to the last id of a smaller one.
        vocabulary = {name: min(value, args.vocab_size - 1) for name in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if (value := getattr(MoTConfig.from_preset(preset), name)) is not None}
        vocabulary["vocab_size"] = args.vocab_size
    return MoTConfig.from_preset(preset, max_position_embeddings=max(args.seq_len, 64), mot_recompute=recompute,
                                 **vocabulary)


def build_model(preset: str, recompute: bool, args) -> MoTForCausalLM:
    config = model_config(preset, recompute, args)
    if args.batch % config.group_size and "mot" in config.mlp_types:
        raise SystemExit(f"--batch {args.batch} must be a multiple of {preset}'s group_size {config.group_size}")
    torch.manual_seed(0)
    model = MoTForCausalLM(config)
    return model.to(torch.bfloat16) if args.bf16_weights else model


def random_tokens(config: MoTConfig, args) -> torch.Tensor:
    """The token ids of every micro-batch of the run, `[steps * sequences per step, seq_len]`, the same for every
    model of one vocabulary."""
    sequences = (args.warmup + args.steps) * args.batch * args.grad_accum
    return torch.randint(0, config.vocab_size, (sequences, args.seq_len), generator=torch.Generator().manual_seed(0))


def training_arguments(scratch: str, args) -> MoTTrainingArguments:
    return MoTTrainingArguments(
        output_dir=scratch, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch, bf16=args.bf16,
        gradient_accumulation_steps=args.grad_accum,
        eval_strategy="no", save_strategy="no", logging_steps=10**9, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, warmup_steps=0, seed=0, use_cpu=not torch.cuda.is_available(),
    )


def run_record(preset: str, recompute: bool, model, steps: list[float], optimizer: list[float], clip: list[float]):
    return {
        "preset": preset,
        "mot_recompute": recompute,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "step_seconds": steps,
        "optimizer_seconds": optimizer,
        "clip_seconds": clip,
    }


def measure(preset: str, recompute: bool, args) -> dict:
    model = build_model(preset, recompute, args)
    data = Dataset.from_dict({"input_ids": random_tokens(model.config, args).tolist()})
    clock = StepClock()
    with tempfile.TemporaryDirectory() as scratch:
        trainer = MoTTrainer(model=model, args=training_arguments(scratch, args), train_dataset=data,
                             data_collator=collate_blocks, callbacks=[clock], plots_at_end=False)
        clock.time_clipping(trainer)
        trainer.train()
    timed = clock.times[args.warmup - 1 :] if args.warmup else [clock.start] + clock.times
    steps = [later - earlier for earlier, later in zip(timed[:-1], timed[1:], strict=True)]
    return run_record(preset, recompute, model, steps, clock.optimizer_seconds[args.warmup :],
                      clock.clip_seconds[args.warmup :])


def measure_interleaved(models: list[tuple[str, bool]], args) -> dict[tuple[str, bool], dict]:
    """All the models in one process, one optimizer step each in turn: a plain loop of what Trainer's step does
    (forward and backward of each micro-batch under the same autocast, the loss divided by the micro-batches, then
    gradient clipping with torch's `clip_grad_norm_`, which Trainer calls through accelerate, and Trainer's own
    optimizer), so that every round of steps meets the same state of a shared machine. The order of the models is
    reversed every other round."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    states = {}
    with tempfile.TemporaryDirectory() as scratch:
        for preset, recompute in models:
            model = build_model(preset, recompute, args).to(device).train()
            training_args = training_arguments(scratch, args)
            trainer = MoTTrainer(model=model, args=training_args, plots_at_end=False)
            optimizer = trainer.create_optimizer(model)
            states[preset, recompute] = (model, optimizer, training_args.max_grad_norm,
                                         random_tokens(model.config, args).to(device), ([], [], []))
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16)
    for step in range(args.warmup + args.steps):
        for key in models if step % 2 == 0 else models[::-1]:
            model, optimizer, max_grad_norm, tokens, (steps, optimizer_seconds, clip_seconds) = states[key]
            synchronize()
            start = time.perf_counter()
            for micro in range(args.grad_accum):
                first = (step * args.grad_accum + micro) * args.batch
                batch = tokens[first : first + args.batch]
                with autocast:
                    loss = model(input_ids=batch, labels=batch).loss / args.grad_accum
                loss.backward()
            synchronize()
            clipping = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            synchronize()
            stepping = time.perf_counter()
            optimizer.step()
            synchronize()
            stepped = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            if step >= args.warmup:
                steps.append(time.perf_counter() - start)
                clip_seconds.append(stepping - clipping)
                optimizer_seconds.append(stepped - stepping)
    return {key: run_record(*key, model, *times) for key, (model, _, _, _, times) in states.items()}


def forward_backward(row: dict) -> float:
    """Seconds per step without gradient clipping and the optimizer step."""
    return row["seconds_per_step"] - row["clip_seconds_per_step"] - row["optimizer_seconds_per_step"]


def recompute_settings(preset: str, args) -> list[bool]:
    """The `mot_recompute` values to train `preset` with: only False for a model without MoT layers."""
    if "mot" not in MoTConfig.from_preset(preset).mlp_types:
        return [False]
    return {"off": [False], "on": [True], "both": [False, True]}[args.mot_recompute]


def summarize(runs: list[dict], args) -> dict:
    """One row from the repeated runs of a model: the median step time over all their timed steps."""
    step_seconds = [seconds for run in runs for seconds in run["step_seconds"]]
    seconds_per_step = statistics.median(step_seconds)
    optimizer_seconds = statistics.median(seconds for run in runs for seconds in run["optimizer_seconds"])
    clip_seconds = statistics.median(seconds for run in runs for seconds in run["clip_seconds"])
    return {
        "preset": runs[0]["preset"],
        "mot_recompute": runs[0]["mot_recompute"],
        "name": runs[0]["preset"] + (" recompute" if runs[0]["mot_recompute"] else ""),
        "parameters": runs[0]["parameters"],
        "weights_dtype": runs[0]["weights_dtype"],
        "timed_steps": len(step_seconds),
        "step_seconds": step_seconds,
        "seconds_per_step": seconds_per_step,
        "optimizer_seconds_per_step": optimizer_seconds,
        "clip_seconds_per_step": clip_seconds,
        "tokens_per_second": args.batch * args.grad_accum * args.seq_len / seconds_per_step,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=["tiny", "medium"])
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), default=None,
                        help="time these presets together instead of --pairs, relative to the first dense one "
                             "(e.g. transformer-medium mot-medium-32e mot-medium-32e-8 mot-medium-32e-16)")
    parser.add_argument("--mot_recompute", nargs="?", choices=["off", "on", "both"], const="on", default="off",
                        help="mot_recompute on the MoT presets: off (default), on (the bare flag), or both (each MoT "
                             "preset with and without)")
    parser.add_argument("--batch", type=int, default=32, help="micro-batch (a multiple of every group_size)")
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--repeats", type=int, default=1,
                        help="train each model of a pair this many times, alternating (median over all of them)")
    parser.add_argument("--bf16", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                        help="bf16 autocast (default true, as in the paper)")
    parser.add_argument("--bf16_weights", action="store_true",
                        help="keep the weights (and optimizer state) in bf16, as `mot train --bf16_weights true`; "
                             "use with --bf16 false")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="the vocabulary of every model (default: each preset's, GPT-2's 50257 for the paper's)")
    parser.add_argument("--json", default="bench/results/train_throughput.json")
    parser.add_argument("--grad_accum", type=int, default=1,
                        help="micro-batches per optimizer step (the paper steps on 256 x 256 tokens)")
    parser.add_argument("--interleaved", action="store_true",
                        help="train the models in one process, one optimizer step each in turn, in a plain loop of "
                             "Trainer's operations (forward, backward, clipping, Trainer's optimizer) instead of "
                             "through Trainer, and report each step over the dense step of its round")
    parser.add_argument("--system_malloc", action="store_true",
                        help="leave glibc malloc as it is (by default freed memory is kept for reuse on CPU, as "
                             "`mot train` does)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        parser.error(f"--repeats and --steps must be at least 1, got {args.repeats} and {args.steps}")
    if args.vocab_size is not None and args.vocab_size < 2:
        parser.error(f"--vocab_size must be at least 2, got {args.vocab_size}")
    if args.bf16_weights and args.bf16:
        parser.error("--bf16_weights trains bf16 weights without autocast: pass --bf16 false with it")
    groups = [args.presets] if args.presets else [list(PAIRS[pair]) for pair in args.pairs]
    for group in groups:
        if not any(is_dense(preset) for preset in group):
            parser.error(f"no dense preset among {', '.join(group)} to compare with")
    if not torch.cuda.is_available() and not args.system_malloc:
        retain_freed_cpu_memory()

    rows = []
    for group in groups:
        models = [(preset, recompute) for preset in group for recompute in recompute_settings(preset, args)]
        runs: dict[tuple[str, bool], list[dict]] = {model: [] for model in models}
        for _ in range(args.repeats):
            if args.interleaved:
                for model, run in measure_interleaved(models, args).items():
                    runs[model].append(run)
            else:
                for model in models:
                    runs[model].append(measure(*model, args))
        results = [summarize(runs[model], args) for model in models]
        dense = next(row for row in results if is_dense(row["preset"]))
        if args.interleaved:  # each step beside the dense step of its round
            for row in results:
                rounds = [seconds / dense_seconds for seconds, dense_seconds in
                          zip(row["step_seconds"], dense["step_seconds"], strict=True)]
                row["round_ratios"] = rounds
                row["round_ratio_median"] = statistics.median(rounds)
        dense_flops = step_flops(model_config(dense["preset"], False, args), args.seq_len)
        for row in results:
            row["step_over_dense"] = row["seconds_per_step"] / dense["seconds_per_step"]
            # The rest of the step (forward and backward, data and logging), which the FLOP floor describes.
            row["forward_backward_over_dense"] = forward_backward(row) / forward_backward(dense)
            row["step_flop_floor"] = step_flops(model_config(row["preset"], row["mot_recompute"], args),
                                                args.seq_len) / dense_flops
            # What the step would take with its forward and backward at that floor, and this model's own
            # clipping and optimizer step (which grow with its parameters), over the dense step.
            clip_and_optimizer = row["clip_seconds_per_step"] + row["optimizer_seconds_per_step"]
            row["floor_with_optimizer"] = ((row["step_flop_floor"] * forward_backward(dense) + clip_and_optimizer)
                                           / dense["seconds_per_step"])
            if row is not dense:
                row["relative_to_dense"] = row["tokens_per_second"] / dense["tokens_per_second"]
        rows += results
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    header = (f"{'model':<30} {'params':>10} {'s/step':>9} {'tokens/s':>11} {'x dense':>8} {'floor':>7} "
              f"{'x floor':>8} {'clip s':>7} {'optim s':>8} {'floor+opt':>10} {'fwd+bwd x dense':>16}")
    print(f"training throughput: batch {args.batch} x {args.seq_len} tokens x {args.grad_accum} micro-batches per "
          f"step, bf16 autocast {args.bf16}, bf16 weights {args.bf16_weights}, vocabulary "
          f"{args.vocab_size or 'of each preset'}, {device}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['name']:<30} {row['parameters'] / 1e6:>9.1f}M {row['seconds_per_step']:>9.3f} "
              f"{row['tokens_per_second']:>11.0f} {row['step_over_dense']:>8.2f} {row['step_flop_floor']:>7.3f} "
              f"{row['step_over_dense'] / row['step_flop_floor']:>8.2f} {row['clip_seconds_per_step']:>7.3f} "
              f"{row['optimizer_seconds_per_step']:>8.3f} {row['floor_with_optimizer']:>10.3f} "
              f"{row['forward_backward_over_dense']:>16.2f}")
    print("x dense: time per step over the dense model's; floor: the step's matmul FLOPs over dense's (forward+backward, "
          "attention and head included, optimizer not); clip s, optim s: gradient clipping and the optimizer step "
          "(AdamW), both over all the parameters; floor+opt: the step with its forward+backward at the floor and its "
          "own clipping and optimizer step, over dense's; fwd+bwd: the rest of the step over dense's")
    for row in rows:
        if "round_ratios" in row and not is_dense(row["preset"]):
            ratios = row["round_ratios"]
            print(f"{row['name']}, each step over the dense step of its round: median {row['round_ratio_median']:.3f},"
                  f" {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} rounds")
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
