"""The paper's central comparison on one GPU, in one command of at most ~9 minutes: Transformer-Medium against
MoT-Medium/32E (and MoT-Medium/32E/16 when the time allows), on ELTeC novels, the paper's recipe with the schedule
shortened to the budget; and the granular variants' cost at their FLOP floor: MoT/32E, /32E/8 and /32E/16, each
with and without `mot_recompute`, beside dense, as a layer and as a training step, time and peak memory.

    python3 bench/gpu/compare.py --corpus bench/gpu/data/eltec_eng_level1_body.txt.gz --out OUT
    python3 bench/gpu/compare.py --toy --corpus ../shared/data/eltec_eng/eltec_eng_level1_body.txt.gz --out /tmp/x

What it does, in order (OUT/gpu_results.json and OUT/gpu_results.md are rewritten, atomically, after each part
and every evaluation, so a run cut short still returns what it measured):
1. a byte-level BPE tokenizer (8,192 tokens) trained once on the first novels; the training text is the novels but
   the last three, whose start is the validation text;
2. `bench/layer.py` on the device: the feed-forward layers' forward+backward time at Medium sizes (bf16 weights
   and bf16 autocast), each MoT variant (32E, 32E/8, 32E/16, each also with `mot_recompute`, and each also with its
   merged and processed tokens forced into either layout, views or expert-major copies, to show which the GPU reads
   faster) over dense beside its FLOP floor, with the bytes saved for backward and the peak memory
   (`torch.cuda.max_memory_allocated`) over dense's;
3. a training step of each of dense, 32E, 32E/8 and 32E/16 (and the three with `mot_recompute`), each model alone
   on the device, on the same batches as below: median step time over the steps after the first two, over
   dense's, beside the step's FLOP floor (bench/flops.py), and peak memory over dense's;
4. each model trained with the same batches in the same order: batch 256 x 256 tokens (`--batch`), bf16 autocast,
   AdamW (0.9, 0.999), weight decay 0.1, clipping 0.5, peak LR 7e-4 (`--lr`), warm-up then cosine to 0.1x, at
   most two epochs of the training text; eval loss on fixed validation blocks at regular steps, against tokens
   and training wall time; tokens/s over the steps after the first two (warm-up: kernel selection, allocator
   growth); peak memory;
5. OUT/gpu_results.md (a table per part) and, where matplotlib is installed, loss plots.

A figure that could not be measured (the layer benchmark failing, a model's training raising) is named in
results["errors"] with the reason, the rest still runs and is written, and the command then prints one line per
missing figure and exits 1.

Needs only torch, transformers and tokenizers (the GPU machine this is made for has no `datasets`, no package
registry): the training loop is a plain PyTorch loop with the recipe of `mot train`. `--toy` runs the same code
at toy size on any device (the CPU test, tests/test_gpu_compare.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # this checkout's package, installed or not (bench/gpu/run.sh also sets PYTHONPATH)

from mixture_of_tokens import MoTConfig, MoTForCausalLM  # noqa: E402
from mixture_of_tokens.data import split_novels  # noqa: E402
from mixture_of_tokens.training.tokenization import train_bpe_tokenizer  # noqa: E402
from mixture_of_tokens.utils import UserError  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from flops import flop_floor, step_flops  # noqa: E402

PAPER_WARMUP_FRACTION = 2_500 / 150_000
MODELS = ("transformer-medium", "mot-medium-32e", "mot-medium-32e-16")
OPTIONAL_MODELS = ("mot-medium-32e-16",)  # trained only if the time left allows it
# The training step timed for each (part 3): dense and the paper's granular variants, MoT also with mot_recompute.
STEP_MODELS = ("transformer-medium", "mot-medium-32e", "mot-medium-32e-8", "mot-medium-32e-16")
STEP_TIMING_STEPS = 5  # timed steps per model in part 3, after TIMING_WARMUP_STEPS (toy: 2)
STEP_TIMING_SHARE = 0.25  # part 3 starts no new model after this share of the budget from its start
TOY_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
TIMING_WARMUP_STEPS = 2  # the first steps of each model are left out of tokens/s (kernel selection, allocator growth)
LAYER_TIMEOUT_SECONDS = 300


def log(message: str) -> None:
    print(f"[gpu-compare {time.strftime('%H:%M:%S')}] {message}", flush=True)


def read_novels(corpus: Path, max_chars: int | None) -> tuple[str, str]:
    """(training text, validation text): every novel but the last three, and the start of those three."""
    try:
        training_novels, held_out = split_novels(corpus)
    except UserError as error:
        raise SystemExit(str(error)) from error
    training = "\n\n".join(training_novels)
    validation = "\n\n".join(held_out)
    if max_chars is not None:
        training, validation = training[:max_chars], validation[:max(max_chars // 20, 20_000)]
    return training, validation[:2_000_000]


def tokenize(tokenizer, text: str, chunk_chars: int = 1_000_000) -> torch.Tensor:
    """The whole text as one stream of token ids (documents end with the end-of-text token)."""
    ids: list[int] = []
    for document in text.split("\n\n"):
        for start in range(0, len(document), chunk_chars):
            ids.extend(tokenizer(document[start:start + chunk_chars])["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def blocks(stream: torch.Tensor, length: int) -> torch.Tensor:
    count = stream.numel() // length
    return stream[:count * length].view(count, length)  # (blocks, length)


def model_config(preset: str, vocab_size: int, seq_len: int, toy: bool) -> MoTConfig:
    overrides = dict(vocab_size=vocab_size, max_position_embeddings=seq_len, bos_token_id=0, eos_token_id=0)
    if toy:
        # The presets' shapes scaled down; G = 8 so that a toy batch of 16 sequences holds two groups.
        overrides.update(TOY_SIZES)
        if preset != "transformer-medium":
            per_group = int(preset.rsplit("-", 1)[1]) if preset.startswith("mot-medium-32e-") else 1  # /8, /16
            overrides.update(mlp_types=["dense", "mot"], group_size=8, num_experts=8 * per_group,
                             expert_size=TOY_SIZES["intermediate_size"] // per_group)
        else:
            overrides.update(mlp_types=["dense", "dense"])
    return MoTConfig.from_preset(preset, **overrides)


def step_name(preset: str, recompute: bool) -> str:
    return preset + (" recompute" if recompute else "")


def paper_optimizer(model, lr: float, device: str) -> torch.optim.AdamW:
    """The paper's AdamW: betas (0.9, 0.999), weight decay 0.1 on matrices, none on vectors."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.999), fused=device == "cuda")


def batch_at(order: torch.Tensor, blocks: torch.Tensor, step: int, batch_size: int, device: str) -> torch.Tensor:
    """Step `step`'s batch of `blocks`, taken in `order` and wrapping into the next epoch."""
    index = order[(step * batch_size) % order.numel():][:batch_size]
    if index.numel() < batch_size:
        index = torch.cat([index, order[:batch_size - index.numel()]])
    return blocks[index].to(device, non_blocking=True)


def timed_optimizer_step(model, optimizer, inputs: torch.Tensor, autocast, device: str) -> tuple[torch.Tensor, float]:
    """One training step (forward, backward, clip at 0.5, AdamW): its loss and its seconds, the GPU synchronised."""
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with autocast():
        loss = model(input_ids=inputs, labels=inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return loss, time.perf_counter() - started


def bf16_autocast(device: str, enabled: bool):
    """A factory of the training steps' autocast contexts: bf16 where enabled (on a GPU always)."""
    return lambda: torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=enabled)


def time_training_steps(preset: str, recompute: bool, args, train_blocks: torch.Tensor, vocab_size: int) -> dict:
    """Part 3 for one model: a fresh model (built on the device) trained `TIMING_WARMUP_STEPS` +
    `args.step_timing_steps` steps on the first batches of the shared order, with the recipe of `train`; the median
    time of the steps after the warm-up, tokens/s, and the peak memory of the whole run (weights, gradients,
    optimizer state, activations)."""
    device = args.device
    torch.manual_seed(0)
    config = model_config(preset, vocab_size, args.seq_len, args.toy)
    config.mot_recompute = recompute
    with torch.device(device):  # initialised on the device: building 7 Medium models on the host would take long
        model = MoTForCausalLM(config)
    model.train()
    optimizer = paper_optimizer(model, args.lr, device)
    autocast = bf16_autocast(device, device == "cuda" or args.toy_bf16)
    order = torch.randperm(train_blocks.shape[0], generator=torch.Generator().manual_seed(0))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for step in range(TIMING_WARMUP_STEPS + args.step_timing_steps):
        inputs = batch_at(order, train_blocks, step, args.batch, device)
        loss, elapsed = timed_optimizer_step(model, optimizer, inputs, autocast, device)
        seconds.append(elapsed)
    median = statistics.median(seconds[TIMING_WARMUP_STEPS:])
    dense = model_config("transformer-medium", vocab_size, args.seq_len, args.toy)
    return {"preset": preset, "mot_recompute": recompute, "parameters": sum(p.numel() for p in model.parameters()),
            "step_seconds": [round(value, 5) for value in seconds], "seconds_per_step": median,
            "tokens_per_second": round(args.batch * args.seq_len / median, 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else None,
            "step_flop_floor": step_flops(config, args.seq_len) / step_flops(dense, args.seq_len),
            "layer_flop_floor": flop_floor(config, dense.intermediate_size, recompute) if "mot" in config.mlp_types
            else 1.0,
            "final_loss": round(float(loss.detach()), 4)}


def step_timing(args, train_blocks: torch.Tensor, vocab_size: int, deadline: float, results: dict, on_row) -> None:
    """Part 3: `results["steps"]` filled row by row (`on_row()` after each); a model that fails is named in
    `results["errors"]` as `step_timing.<model>`, one left out for lack of time in `results["step_timing"]["skipped"]`."""
    part = results["step_timing"] = {
        "batch": args.batch, "seq_len": args.seq_len, "warmup_steps": TIMING_WARMUP_STEPS,
        "timed_steps": args.step_timing_steps, "bf16_autocast": args.device == "cuda" or args.toy_bf16,
        "rows": {}, "skipped": [],
    }
    models = [(preset, recompute) for preset in STEP_MODELS
              for recompute in ((False,) if preset == "transformer-medium" else (False, True))]
    for preset, recompute in models:
        name = step_name(preset, recompute)
        if time.perf_counter() > deadline:
            part["skipped"].append(name)
            log(f"step timing: no time left for {name}")
            continue
        try:
            row = time_training_steps(preset, recompute, args, train_blocks, vocab_size)
        except Exception as error:  # out of memory, say: the other models are still timed
            why = one_line(f"training step raised {type(error).__name__}: {error}")
            results["errors"][f"step_timing.{name}"] = why
            log(f"step timing: {name} failed: {why}")
        else:
            part["rows"][name] = row
            dense = part["rows"].get("transformer-medium")
            if dense:
                for entry in part["rows"].values():
                    entry["step_over_dense"] = entry["seconds_per_step"] / dense["seconds_per_step"]
                    entry["peak_memory_over_dense"] = None if dense["peak_memory_gib"] is None else \
                        entry["peak_memory_gib"] / dense["peak_memory_gib"]
            memory = "" if row["peak_memory_gib"] is None else f", peak {row['peak_memory_gib']:.2f} GiB"
            log(f"step timing: {name}: {row['seconds_per_step'] * 1e3:.1f} ms/step{memory}")
        if args.device == "cuda":
            torch.cuda.empty_cache()
        on_row()


def learning_rate_at(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warm-up, then cosine from the peak down to 0.1x (the paper's schedule, `mot train`'s default)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, valid: torch.Tensor, batch: int, device: str, autocast) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, valid.shape[0] - batch + 1, batch):
        inputs = valid[start:start + batch].to(device)
        with autocast():
            loss = model(input_ids=inputs, labels=inputs).loss
        total += float(loss) * inputs.numel()
        count += inputs.numel()
    model.train()
    return total / count


def train(preset: str, args, train_blocks: torch.Tensor, valid: torch.Tensor, vocab_size: int, deadline: float,
          run: dict, on_eval) -> dict:
    """Train one model; `run` (the model's entry in the results) is filled in place and `on_eval()` is called after
    every evaluation, so the results on disk follow the training."""
    device = args.device
    torch.manual_seed(0)
    config = model_config(preset, vocab_size, args.seq_len, args.toy)
    model = MoTForCausalLM(config).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = paper_optimizer(model, args.lr, device)
    autocast = bf16_autocast(device, device == "cuda" or args.toy_bf16)
    steps, warmup = args.steps, max(1, round(args.steps * args.warmup_fraction))
    order = torch.randperm(train_blocks.shape[0], generator=torch.Generator().manual_seed(0))  # same for every model
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    curve = [{"step": 0, "tokens": 0, "train_seconds": 0.0, "eval_loss": evaluate(model, valid, args.eval_batch,
                                                                                   device, autocast)}]
    train_seconds, tokens = 0.0, 0
    timed_seconds, timed_tokens, timed_steps = 0.0, 0, 0  # the steps after the first TIMING_WARMUP_STEPS
    warmup_seconds, warmup_tokens = 0.0, 0  # the first TIMING_WARMUP_STEPS (used only if no step came after them)
    run.update(preset=preset, parameters=parameters, steps_planned=steps, stopped=None, curve=curve,
               config={k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                       "group_size", "num_experts", "expert_size", "mlp_types")})

    def record() -> None:
        if timed_steps:
            per_second, over = timed_tokens / max(timed_seconds, 1e-9), f"steps {TIMING_WARMUP_STEPS + 1}-{completed}"
        elif tokens:  # stopped within the warm-up steps: the only timing there is
            per_second, over = warmup_tokens / max(warmup_seconds, 1e-9), f"steps 1-{completed}, warm-up included"
        else:
            per_second, over = None, "no step"
        run.update(tokens=tokens, train_seconds=round(train_seconds, 2),
                   tokens_per_second=None if per_second is None else round(per_second, 1),
                   tokens_per_second_over=over, final_eval_loss=curve[-1]["eval_loss"],
                   peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None)
        on_eval()

    completed = 0  # steps done
    log(f"{preset}: {parameters / 1e6:.1f}M parameters, {steps} steps of {args.batch} x {args.seq_len} tokens")
    for step in range(steps):
        if time.perf_counter() > deadline:
            run["stopped"] = f"time budget reached after {step} of {steps} steps"
            log(f"{preset}: {run['stopped']}")
            break
        inputs = batch_at(order, train_blocks, step, args.batch, device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, steps, warmup, args.lr)
        loss, elapsed = timed_optimizer_step(model, optimizer, inputs, autocast, device)
        train_seconds += elapsed
        tokens += inputs.numel()
        completed = step + 1
        if step < TIMING_WARMUP_STEPS:
            warmup_seconds, warmup_tokens = warmup_seconds + elapsed, warmup_tokens + inputs.numel()
        else:
            timed_seconds, timed_tokens, timed_steps = timed_seconds + elapsed, timed_tokens + inputs.numel(), \
                timed_steps + 1
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "tokens": tokens, "train_seconds": round(train_seconds, 3),
                          "train_loss": round(float(loss.detach()), 4),
                          "eval_loss": evaluate(model, valid, args.eval_batch, device, autocast)})
            record()
            log(f"{preset}: step {step + 1}, eval loss {curve[-1]['eval_loss']:.4f}, "
                f"{run['tokens_per_second']:,.0f} tokens/s over {run['tokens_per_second_over']}")
    if curve[-1]["tokens"] != tokens:  # stopped between evaluations
        curve.append({"step": completed, "tokens": tokens, "train_seconds": round(train_seconds, 3),
                      "eval_loss": evaluate(model, valid, args.eval_batch, device, autocast)})
    if run.get("tokens") != tokens:  # not recorded since the last step (or stopped before the first)
        record()
    return run


def python_command(script: Path, *arguments: str) -> list[str]:
    """A command running `script` with this interpreter (never a `python` looked up on PATH)."""
    return [sys.executable, str(script), *arguments]


def subprocess_env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH, so a child imports this checkout's package even
    where it is not installed."""
    env = dict(os.environ)
    paths = [path for path in env.get("PYTHONPATH", "").split(os.pathsep) if path]
    if str(REPO) not in paths:
        paths.insert(0, str(REPO))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def tail(text: str | bytes | None, lines: int = 5) -> str:
    """The last `lines` non-empty lines of a process's output."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join([line for line in (text or "").strip().splitlines() if line.strip()][-lines:])


def one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def layer_benchmark(args, out: Path) -> tuple[dict | None, str | None, str]:
    """bench/layer.py on the device (Medium sizes, bf16 weights and bf16 autocast): (results, None, stderr tail),
    or (None, why it failed in one line, stderr tail)."""
    target = out / "layer.json"
    target.unlink(missing_ok=True)
    arguments = ["--device", args.device, "--out", str(target), "--precisions", "bf16", "bf16_autocast",
                 "--compare_layouts"]
    if args.toy:
        arguments += ["--rounds", "1", "--warmup", "0", "--batch", "32", "--seq", "4"]
    try:
        result = subprocess.run(python_command(REPO / "bench" / "layer.py", *arguments), capture_output=True,
                                text=True, env=subprocess_env(), timeout=LAYER_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as error:
        stderr = tail(error.stderr)
        return None, one_line(f"bench/layer.py timed out after {LAYER_TIMEOUT_SECONDS} s: {tail(stderr, 1)}"), stderr
    stderr = tail(result.stderr)
    if result.returncode != 0:
        why = f"bench/layer.py exited with {result.returncode}: {tail(stderr, 1) or tail(result.stdout, 1)}"
        return None, one_line(why), stderr
    try:
        layer = json.loads(target.read_text())
        missing = [p for p in ("bf16", "bf16_autocast") if p not in layer["seconds"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, one_line(f"bench/layer.py wrote no readable {target.name}: {type(error).__name__}: {error}"), \
            stderr
    if missing:
        return None, f"bench/layer.py measured no {', '.join(missing)}", stderr
    return layer, None, stderr


def render_markdown(results: dict) -> str:
    lines = ["# GPU comparison: Transformer-Medium vs MoT-Medium/32E", "",
             f"_`bench/gpu/compare.py` on {results['device']} (torch {results['torch']}, transformers "
             f"{results['transformers']}), {results['total_seconds'] / 60:.1f} min in all"
             f"{'' if results.get('complete') else ' so far (still running, or cut short)'}._", "",
             f"- Data: ELTeC-eng novels, {results['train_tokens']:,} training tokens "
             f"({results['vocab_size']}-token BPE), {results['valid_tokens']:,} validation tokens (held-out novels).",
             f"- Schedule: {results['steps']} steps of {results['batch']} x {results['seq_len']} tokens "
             f"({results['epochs']:.2f} epochs), peak LR {results['lr']:g}, warm-up {results['warmup_steps']} steps, "
             f"cosine to 0.1x, AdamW (0.9, 0.999), weight decay 0.1, clip 0.5, "
             f"{'bf16 autocast' if results['bf16_autocast'] else 'fp32'}.",
             f"- Tokens/s: {results['tokens_per_second_note']}.", "",
             "| model | params | tokens | final eval loss | tokens/s | peak memory | note |", "|---|---|---|---|---|---|---|"]
    for run in results["runs"].values():
        memory = "n/a" if run["peak_memory_gib"] is None else f"{run['peak_memory_gib']:.1f} GiB"
        per_second = "n/a" if run["tokens_per_second"] is None else f"{run['tokens_per_second']:,.0f}"
        note = "; ".join(part for part in (run["stopped"], run.get("failed") and f"failed: {run['failed']}") if part)
        lines.append(f"| {run['preset']} | {run['parameters'] / 1e6:.1f}M | {run['tokens']:,} | "
                     f"{run['final_eval_loss']:.4f} | {per_second} | {memory} | {note} |")
    skipped = results.get("skipped")
    if skipped:
        lines += ["", f"Not trained: {skipped}."]
    if results.get("errors"):
        lines += ["", "Missing figures:", ""] + [f"- {figure}: {why}" for figure, why in results["errors"].items()]
    steps = results.get("step_timing")
    if steps and steps["rows"]:
        lines += ["", f"Training step at Medium sizes ({steps['batch']} x {steps['seq_len']} tokens, "
                  f"{'bf16 autocast' if steps['bf16_autocast'] else 'fp32'}, AdamW; median of {steps['timed_steps']} "
                  f"steps after {steps['warmup_steps']} warm-up steps, each model alone on the device; FLOP floors "
                  "from bench/flops.py: the step's matmul FLOPs over dense's, and the MoT layer's):", "",
                  "| model | params | ms/step | x dense | step FLOP floor | layer FLOP floor | peak memory | x dense |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, row in steps["rows"].items():
            over = row.get("step_over_dense")
            memory = "n/a" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f} GiB"
            memory_over = row.get("peak_memory_over_dense")
            lines.append(f"| {name} | {row['parameters'] / 1e6:.1f}M | {row['seconds_per_step'] * 1e3:.1f} | "
                         f"{'n/a' if over is None else f'{over:.2f}'} | {row['step_flop_floor']:.3f} | "
                         f"{row['layer_flop_floor']:.3f} | {memory} | "
                         f"{'n/a' if memory_over is None else f'{memory_over:.2f}'} |")
        if steps.get("skipped"):
            lines += ["", f"Not timed for lack of time: {', '.join(steps['skipped'])}."]
    layer = results.get("layer")
    if layer:
        precisions = [p for p in ("bf16", "bf16_autocast") if p in layer["seconds"]]
        titles = {"bf16": "bf16 weights", "bf16_autocast": "bf16 autocast"}
        peaks = {p: (layer.get("peak_bytes") or {}).get(p) or {} for p in precisions}
        head = ["layer", "FLOP floor"]
        for precision in precisions:
            head += [f"{titles[precision]} ms", "x dense", "saved x dense"]
            if any(value is not None for value in peaks[precision].values()):
                head.append("peak memory x dense")
        lines += ["", f"Feed-forward layer forward+backward at Medium sizes (`bench/layer.py`, {layer['tokens']:,} "
                  "tokens, median of interleaved rounds; FLOP floor: matmul FLOPs over dense's, with the second "
                  "forward for recompute rows; saved: bytes kept for backward; peak: `torch.cuda.max_memory_allocated` "
                  "during one forward+backward):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in layer["seconds"][precisions[0]]:
            info = (layer.get("rows") or {}).get(name, {})
            floor = info.get("flop_floor_with_recompute") or info.get("flop_floor")
            cells = [info.get("label", name), "" if floor is None else f"{floor:.3f}"]
            for precision in precisions:
                seconds = layer["seconds"][precision]
                saved = (layer.get("saved_bytes") or {}).get(precision) or {}
                cells += [f"{seconds[name] * 1e3:.2f}", f"{seconds[name] / seconds['dense']:.2f}",
                          f"{saved[name] / saved['dense']:.2f}" if saved.get(name) is not None and saved.get("dense")
                          else "n/a"]
                if any(value is not None for value in peaks[precision].values()):
                    peak = peaks[precision]
                    cells.append(f"{peak[name] / peak['dense']:.2f}" if peak.get(name) and peak.get("dense")
                                 else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
    if results.get("plots"):
        lines += [""] + [f"![{name}]({name})" for name in results["plots"]]
    return "\n".join(lines) + "\n"


def write_plots(results: dict, out: Path) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written = []
    for key, label, name in (("tokens", "training tokens", "gpu_loss_vs_tokens.png"),
                             ("train_seconds", "training wall time (s)", "gpu_loss_vs_time.png")):
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for run in results["runs"].values():
            points = [p for p in run["curve"] if p["step"] > 0]
            axis.plot([p[key] for p in points], [p["eval_loss"] for p in points], marker="o", markersize=3,
                      label=run["preset"])
        axis.set_xlabel(label)
        axis.set_ylabel("eval loss (nats/token)")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
        figure.tight_layout()
        figure.savefig(out / name, dpi=90)
        plt.close(figure)
        written.append(name)
    return written


def write_atomically(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a reader (or a run killed mid-write) never sees half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def save(results: dict, out: Path, started: float) -> None:
    """OUT/gpu_results.json and OUT/gpu_results.md as they stand now."""
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    write_atomically(out / "gpu_results.json", json.dumps(results, indent=1) + "\n")
    write_atomically(out / "gpu_results.md", render_markdown(results))


def missing_figures(results: dict, models: list[str]) -> dict[str, str]:
    """Figure -> why it is missing, for every figure this run should have measured but did not (a model skipped
    for lack of time is named in results["skipped"], not here)."""
    missing = dict(results.get("errors", {}))
    if results.get("layer") is None:
        missing.setdefault("layer", "bench/layer.py did not run")
    if results.get("step_timing") is None:
        missing.setdefault("step_timing", "the training steps were not timed")
    skipped = results.get("skipped") or ""
    for preset in models:
        run = results["runs"].get(preset)
        if run is None and skipped.split(" ")[0] != preset:
            missing.setdefault(f"runs.{preset}", "not trained")
        elif run is not None and not run.get("tokens"):
            missing.setdefault(f"runs.{preset}", "no training step ran")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="eltec_eng_level1_body.txt.gz")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_results.json/.md and plots")
    parser.add_argument("--toy", action="store_true", help="toy sizes, a few steps: the CPU test of this script")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=9.0, help="budget for the whole command (default 9)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 256; toy 16)")
    parser.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default 256; toy 32)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per model (default: two epochs of the training text, at most 600)")
    parser.add_argument("--lr", type=float, default=7e-4, help="peak learning rate (the paper's MoT-Medium 7e-4)")
    parser.add_argument("--vocab_size", type=int, default=None, help="BPE vocabulary (default 8192; toy 512)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--step_timing_steps", type=int, default=None,
                        help=f"timed training steps per model in the step timing of {', '.join(STEP_MODELS)} "
                             f"(default {STEP_TIMING_STEPS}; toy 2)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.minutes * 60 - 20  # leave time to write the results
    if not args.corpus.is_file():
        raise SystemExit(f"--corpus {args.corpus} does not exist")
    args.batch = args.batch or (16 if args.toy else 256)
    args.seq_len = args.seq_len or (32 if args.toy else 256)
    args.eval_batch = 16 if args.toy else 64  # a multiple of every group size (32)
    args.warmup_fraction = max(PAPER_WARMUP_FRACTION, 0.02)
    args.toy_bf16 = False
    args.step_timing_steps = args.step_timing_steps or (2 if args.toy else STEP_TIMING_STEPS)
    vocab_size = args.vocab_size or (512 if args.toy else 8192)
    args.out.mkdir(parents=True, exist_ok=True)

    import transformers

    cpu = platform.processor() or platform.machine()
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({cpu})",
               "torch": torch.__version__, "transformers": transformers.__version__, "toy": args.toy,
               "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr, "vocab_size": vocab_size, "runs": {}}
    training_text, validation_text = read_novels(args.corpus, 400_000 if args.toy else None)
    log(f"training a {vocab_size}-token BPE on {min(len(training_text), 20_000_000):,} characters")
    tokenizer = train_bpe_tokenizer((line for line in training_text[:20_000_000].splitlines() if line.strip()),
                                    vocab_size=vocab_size)
    train_blocks = blocks(tokenize(tokenizer, training_text), args.seq_len)
    valid = blocks(tokenize(tokenizer, validation_text), args.seq_len)[:(16 if args.toy else 256)]
    epoch_steps = train_blocks.shape[0] // args.batch
    args.steps = args.steps or min(2 * epoch_steps, 6 if args.toy else 600)
    args.eval_every = max(1, args.steps // (3 if args.toy else 12))
    results.update(train_tokens=train_blocks.numel(), valid_tokens=valid.numel(), steps=args.steps,
                   epochs=args.steps / max(1, epoch_steps), warmup_steps=max(1, round(args.steps * args.warmup_fraction)),
                   tokenizer_seconds=round(time.perf_counter() - started, 1))
    log(f"{train_blocks.numel():,} training tokens, {args.steps} steps per model "
        f"({results['epochs']:.2f} epochs); data ready after {results['tokenizer_seconds']:.0f} s")
    results.update(complete=False, errors={}, bf16_autocast=args.device == "cuda" or args.toy_bf16,
                   tokens_per_second_note=f"training steps only (no evaluation), over each model's steps after the "
                                          f"first {TIMING_WARMUP_STEPS} (warm-up: kernel selection, allocator growth)")
    save(results, args.out, started)

    results["layer"], why, results["layer_stderr_tail"] = layer_benchmark(args, args.out)
    if why:
        results["errors"]["layer"] = why
        log(f"layer benchmark failed: {why}")
    save(results, args.out, started)
    step_deadline = min(deadline, time.perf_counter() + STEP_TIMING_SHARE * args.minutes * 60)
    step_timing(args, train_blocks, vocab_size, step_deadline, results, lambda: save(results, args.out, started))
    save(results, args.out, started)
    models = list(args.models)
    for index, preset in enumerate(models):
        left = deadline - time.perf_counter()
        previous = [run.get("train_seconds", 0.0) for run in results["runs"].values()]
        estimate = max(previous) * 1.6 if previous else 0.0  # MoT /16 is slower than /32E; evaluations add more
        if preset in OPTIONAL_MODELS and estimate > left:
            results["skipped"] = f"{preset} (about {estimate / 60:.1f} min needed, {left / 60:.1f} min left)"
            log(f"skipping {results['skipped']}")
            save(results, args.out, started)
            continue
        required_left = [m for m in models[index:] if m not in OPTIONAL_MODELS]
        model_deadline = time.perf_counter() + left / max(1, len(required_left)) if preset not in OPTIONAL_MODELS \
            else deadline
        run: dict = {}

        def on_eval(preset=preset, run=run) -> None:
            results["runs"][preset] = run
            save(results, args.out, started)

        try:
            train(preset, args, train_blocks, valid, vocab_size, model_deadline, run, on_eval)
        except Exception as error:  # one model failing (out of memory, say) leaves the others to measure
            why = one_line(f"training raised {type(error).__name__}: {error}")
            results["errors"][f"runs.{preset}"] = why
            if "tokens" in run:
                run["failed"] = why
            log(f"{preset} failed: {why}")
        save(results, args.out, started)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    try:
        results["plots"] = write_plots(results, args.out)
    except Exception as error:  # the plots are a convenience; the figures are in the tables
        log(f"no plots: {type(error).__name__}: {error}")
    missing = missing_figures(results, models)
    results["errors"] = missing
    results["complete"] = True
    save(results, args.out, started)
    log(f"wrote {args.out / 'gpu_results.md'} in {results['total_seconds'] / 60:.1f} min")
    for figure, why in missing.items():
        print(f"bench/gpu/compare.py: error: missing figure {figure}: {why}", file=sys.stderr, flush=True)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
