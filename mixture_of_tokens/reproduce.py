"""`mot reproduce` (also `python bench/reproduce.py`): a small-scale reproduction of the paper's claims.

One command trains every model of the comparison on the same novels (ELTeC-eng from `../shared/data`), the same
tokenizer (trained once, shared), the same token stream and the same schedule, then runs the extra experiments and
writes `results.json`, PNG plots and `results.md`:

- main comparison: dense, MoT (flop-matched, E = G), MoT with many small experts (the /16 setting: E = 16 G,
  f = d_ff / 16), MoT with uniform routing, Token Choice and Expert Choice (same E and f as MoT: same parameters,
  same FLOPs per token);
- bf16-only weights (`--bf16_weights`) against the full-precision runs, for MoT and Expert Choice;
- transition tuning MoT -> Token Choice for +10% steps (`mot transition`, optimizer state continued);
- group-size sweep (G = E = 8, 16, 32, f = d_ff: flop-matched, parameters grow with G) and temperature sweep
  (fixed 0.5, 1, 2 and a learnable one);
- zero-shot PIQA / HellaSwag / ARC-Easy (`mot eval --data_dir`) of the final models.

Training and evaluation run in this process through `mot train`'s `run_training`, `mot transition` and
`mot eval`'s `main`, so the libraries are imported once. `--scale N` grows every model (width x N), the sequence
length, the vocabulary and the step count, for a GPU. `--smoke` runs a few steps of everything (for the tests).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .utils import UserError, atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT_DIR = REPO_ROOT / "runs" / "reproduce"
DOCS_DIR = REPO_ROOT / "docs"
CORPUS = Path("eltec_eng") / "eltec_eng_level1_body.txt.gz"
ZERO_SHOT_TASKS = ("piqa", "hellaswag", "arc_easy")
PLOTS_FOLDER = "results"  # beside results.md, so the same relative links work in the output dir and in docs/
PLOT_FILES = ("loss_vs_step.png", "loss_vs_time.png", "transition.png", "routing_entropy.png")
HELD_OUT_NOVELS = 3  # the last novels of the corpus are the validation text
CHARS_PER_TOKEN = 4.0  # generous estimate for a small byte-level BPE on English prose
TRANSITION_FRACTION = 0.10  # the paper: 150K MoT steps + 15K Token Choice steps


def default_data_dir() -> Path:
    return Path(os.environ.get("MOT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


# ------------------------------------------------------------------------------------------------ the budget
@dataclass(frozen=True)
class Budget:
    """Model size, data and schedule shared by every run."""

    steps: int
    hidden_size: int
    num_layers: int
    num_heads: int
    d_ff: int
    block_size: int
    vocab_size: int
    batch_size: int
    eval_every: int
    eval_blocks: int
    zero_shot_limit: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size

    @property
    def train_chars(self) -> int:
        return int(self.steps * self.tokens_per_step * CHARS_PER_TOKEN * 1.1) + 200_000

    @property
    def valid_chars(self) -> int:
        return int(self.eval_blocks * self.block_size * CHARS_PER_TOKEN * 1.5) + 20_000


def make_budget(scale: int, smoke: bool, steps: int | None = None, zero_shot_limit: int | None = None) -> Budget:
    """The default: a 4-block model of width 128, 400 steps per run (under an hour in all on a shared 2-core CPU);
    `scale` multiplies width,
    steps, context (up to the paper's 256) and vocabulary (up to 8192)."""
    if smoke:
        budget = Budget(steps=4, hidden_size=32, num_layers=2, num_heads=2, d_ff=64, block_size=16, vocab_size=512,
                        batch_size=32, eval_every=2, eval_blocks=32, zero_shot_limit=2)
    else:
        budget = Budget(steps=400 * scale, hidden_size=128 * scale, num_layers=4, num_heads=4 * scale,
                        d_ff=256 * scale, block_size=min(64 * scale, 256), vocab_size=min(2048 * scale, 8192),
                        batch_size=32, eval_every=40 * scale, eval_blocks=64, zero_shot_limit=50 * scale)
    changes = {}
    if steps is not None:
        changes.update(steps=steps, eval_every=max(1, steps // 10))
    if zero_shot_limit is not None:
        changes["zero_shot_limit"] = zero_shot_limit
    return Budget(**{**asdict(budget), **changes}) if changes else budget


# ------------------------------------------------------------------------------------------------ the runs
@dataclass(frozen=True)
class RunSpec:
    """One training run: its name, what it shows, and its model (config overrides of `mot train`)."""

    name: str
    description: str
    mlp: str  # feed-forward type of the routed half of the blocks ("dense" = no routed layer)
    group_size: int = 8
    experts_per_group: int = 1  # E = group_size * experts_per_group; f = d_ff / experts_per_group (params, FLOPs)
    overrides: dict = field(default_factory=dict)  # further `mot train` config overrides
    bf16_weights: bool = False
    zero_shot: bool = False
    section: str = "main"  # main, bf16, group_size, temperature

    def train_flags(self, budget: Budget) -> list[str]:
        routed = budget.num_layers // 2
        mlp_types = ["dense"] * (budget.num_layers - routed) + [self.mlp] * routed
        flags = {
            "hidden_size": budget.hidden_size, "num_hidden_layers": budget.num_layers,
            "num_attention_heads": budget.num_heads, "intermediate_size": budget.d_ff,
            "max_position_embeddings": budget.block_size, "mlp_types": ",".join(mlp_types),
            "group_size": self.group_size, "num_experts": self.group_size * self.experts_per_group,
            "expert_size": budget.d_ff // self.experts_per_group, **self.overrides,
        }
        argv = ["--preset", "tiny-mot"]
        for name, value in flags.items():
            argv += [f"--{name}", str(value)]
        return argv + (["--bf16_weights", "true"] if self.bf16_weights else [])


RUNS: tuple[RunSpec, ...] = (
    RunSpec("dense", "dense Transformer (baseline)", "dense", zero_shot=True),
    RunSpec("mot", "MoT, G = E = 8, f = d_ff (flop-matched)", "mot", zero_shot=True),
    RunSpec("mot_x16", "MoT /16: E = 16 G = 128 experts of f = d_ff/16", "mot", experts_per_group=16, zero_shot=True),
    RunSpec("mot_uniform", "MoT, uniform routing (weights 1/G)", "mot", overrides={"mot_routing": "uniform"},
            zero_shot=True),
    RunSpec("token_choice", "Token Choice top-1, E = 8, f = d_ff, cf 1.25", "token_choice", zero_shot=True),
    RunSpec("expert_choice", "Expert Choice, G = E = 8, f = d_ff", "expert_choice", zero_shot=True),
    RunSpec("mot_bf16", "MoT, bf16-only weights and optimizer state", "mot", bf16_weights=True, section="bf16"),
    RunSpec("expert_choice_bf16", "Expert Choice, bf16-only weights and optimizer state", "expert_choice",
            bf16_weights=True, section="bf16"),
    RunSpec("mot_g16", "MoT, G = E = 16, f = d_ff", "mot", group_size=16, section="group_size"),
    RunSpec("mot_g32", "MoT, G = E = 32, f = d_ff", "mot", group_size=32, section="group_size"),
    RunSpec("mot_t0.5", "MoT, fixed temperature 0.5", "mot", overrides={"mot_temperature": 0.5},
            section="temperature"),
    RunSpec("mot_t2", "MoT, fixed temperature 2", "mot", overrides={"mot_temperature": 2.0}, section="temperature"),
    RunSpec("mot_t_learned", "MoT, learnable temperature (one per layer, starts at 1)", "mot",
            overrides={"learnable_temperature": "shared"}, section="temperature"),
)
BASELINE = "dense"
TRANSITION_SOURCE = "mot"
TRANSITION = "transition_token_choice"
BF16_PAIRS = {"mot": "mot_bf16", "expert_choice": "expert_choice_bf16"}
GROUP_SWEEP = ("mot", "mot_g16", "mot_g32")
TEMPERATURE_SWEEP = ("mot_t0.5", "mot", "mot_t2", "mot_t_learned")


# ------------------------------------------------------------------------------------------------ data
def prepare_data(data_dir: Path, folder: Path, budget: Budget) -> tuple[Path, Path]:
    """Write the training text (the first novels, whole, up to the budget) and the validation text (the start of
    the last novels, never trained on) as .txt files in `mot train`'s format (an empty line ends a document)."""
    corpus = data_dir / CORPUS
    if not corpus.is_file():
        raise UserError(f"the novels corpus {corpus} does not exist; pass --data_dir pointing at shared/data (the "
                        f"folder holding {CORPUS})")
    with gzip.open(corpus, "rt", encoding="utf-8") as handle:
        novels = [text.strip("\n") for text in handle.read().split("\n\n") if text.strip()]
    if len(novels) <= HELD_OUT_NOVELS:
        raise UserError(f"{corpus} holds {len(novels)} documents; need more than {HELD_OUT_NOVELS}")
    training, total = [], 0
    for novel in novels[:-HELD_OUT_NOVELS]:
        take = novel[:budget.train_chars - total]
        training.append(take[:take.rfind("\n")] if len(take) < len(novel) and "\n" in take else take)
        total += len(training[-1])
        if total >= budget.train_chars:
            break
    validation = "\n\n".join(novels[-HELD_OUT_NOVELS:])[:budget.valid_chars]
    validation = validation[:validation.rfind("\n")]
    folder.mkdir(parents=True, exist_ok=True)
    train_file, valid_file = folder / "train.txt", folder / "valid.txt"
    train_file.write_text("\n\n".join(training) + "\n", encoding="utf-8")
    valid_file.write_text(validation + "\n", encoding="utf-8")
    return train_file, valid_file


def train_shared_tokenizer(train_file: Path, folder: Path, vocab_size: int) -> Path:
    from .tokenization import train_bpe_tokenizer

    with open(train_file, encoding="utf-8") as handle:
        tokenizer = train_bpe_tokenizer((line for line in handle if line.strip()), vocab_size=vocab_size)
    tokenizer.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ training
def make_train_clock():
    """A Trainer callback that measures training time only (optimizer steps, not evaluation or saving) and records
    `(step, eval_loss, training seconds)` at every evaluation."""
    from transformers import TrainerCallback

    class TrainClock(TrainerCallback):
        def __init__(self):
            self.seconds = 0.0
            self._started = None
            self.points: list[dict] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self._started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self._started

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics and "eval_loss" in metrics and all(p["step"] != state.global_step for p in self.points):
                self.points.append({"step": state.global_step, "eval_loss": float(metrics["eval_loss"]),
                                    "train_seconds": round(self.seconds, 3)})

    return TrainClock()


def common_train_flags(budget: Budget, train_file: Path, valid_file: Path, tokenizer_dir: Path) -> list[str]:
    return [
        "--dataset", str(train_file), "--validation_file", str(valid_file), "--tokenizer", str(tokenizer_dir),
        "--block_size", str(budget.block_size), "--max_steps", str(budget.steps),
        "--per_device_train_batch_size", str(budget.batch_size), "--per_device_eval_batch_size",
        str(budget.batch_size), "--max_eval_blocks", str(budget.eval_blocks), "--eval_steps", str(budget.eval_every),
        "--logging_steps", str(budget.eval_every), "--seed", "0", "--data_seed", "0", "--report_to", "none",
        "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--overwrite_output_dir", "true",
    ]


def routing_entropy_series(log_history: list[dict], group_size: int) -> list[dict]:
    """Mean MoT mixing-weight entropy over the routed layers at each logged step, also divided by log(G) (1 =
    uniform weights, 0 = one token per expert)."""
    series = []
    for entry in log_history:
        values = [v for k, v in entry.items() if k.startswith("routing/layer_") and k.endswith("/mixing_entropy")]
        if values and "step" in entry:
            mean = sum(float(v) for v in values) / len(values)
            series.append({"step": entry["step"], "entropy": round(mean, 5),
                           "normalized": round(mean / math.log(group_size), 5) if group_size > 1 else None})
    return series


def train_run(spec: RunSpec, budget: Budget, common: list[str], runs_dir: Path, save_checkpoint: bool) -> dict:
    from .train import parse_args, run_training

    output = runs_dir / spec.name
    saving = (["--save_strategy", "steps", "--save_steps", str(budget.steps), "--save_total_limit", "1"]
              if save_checkpoint else ["--save_strategy", "no"])
    model_args, data_args, training_args = parse_args(
        ["--output_dir", str(output), *common, *spec.train_flags(budget), *saving])
    clock = make_train_clock()
    outcome = run_training(model_args, data_args, training_args, callbacks=[clock])
    config = outcome.trainer.model.config
    return {
        "description": spec.description, "section": spec.section, "model_dir": str(output),
        "mlp_types": list(config.mlp_types), "group_size": config.group_size, "num_experts": config.num_experts,
        "expert_size": config.expert_size, "bf16_weights": spec.bf16_weights,
        "num_parameters": outcome.metrics["num_parameters"], "steps": budget.steps,
        "final_eval_loss": outcome.eval_loss, "train_seconds": round(clock.seconds, 2), "curve": clock.points,
        "routing_entropy": routing_entropy_series(outcome.trainer.state.log_history, config.group_size),
    }


def transition_run(source_dir: Path, budget: Budget, runs_dir: Path) -> dict:
    from .convert import transition

    steps = max(1, math.ceil(TRANSITION_FRACTION * budget.steps))
    every = max(1, steps // 5)
    output = runs_dir / TRANSITION
    outcome, checkpoint = transition([
        str(source_dir), str(output), "--steps", str(steps), "--overwrite", "--eval_on_start", "true",
        "--eval_steps", str(every), "--logging_steps", str(every), "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "true", "--seed", "0", "--data_seed", "0", "--dataloader_num_workers", "0",
    ])
    curve = [{"step": entry["step"], "eval_loss": float(entry["eval_loss"])}
             for entry in outcome.trainer.state.log_history if "eval_loss" in entry]
    unique = {point["step"]: point for point in reversed(curve)}  # the final evaluate() repeats the last step
    return {"description": "MoT run converted to Token Choice (same tensors), trained +10% steps",
            "model_dir": str(output), "steps": steps, "optimizer_continued": checkpoint is not None,
            "final_eval_loss": outcome.eval_loss, "curve": sorted(unique.values(), key=lambda p: p["step"])}


class RunRecords:
    """Each finished step's result as a JSON file, so `--resume` can finish an interrupted reproduction."""

    def __init__(self, folder: Path, budget: Budget):
        self.folder = folder
        self.budget = asdict(budget)

    def budget_matches(self) -> bool:
        path = self.folder / "budget.json"
        return path.is_file() and json.loads(path.read_text(encoding="utf-8")) == self.budget

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "budget.json").write_text(json.dumps(self.budget, indent=2) + "\n", encoding="utf-8")

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.json") if p.stem != "budget")

    def has(self, name: str) -> bool:
        return (self.folder / f"{name}.json").is_file()

    def get(self, name: str) -> dict:
        return json.loads((self.folder / f"{name}.json").read_text(encoding="utf-8"))

    def put(self, name: str, record: dict) -> dict:
        atomic_write_text(self.folder / f"{name}.json", json.dumps(record, indent=2) + "\n")
        return record


# ------------------------------------------------------------------------------------------------ analysis
def first_crossing(curve: list[dict], target: float, key: str) -> float | None:
    """The (linearly interpolated) value of `key` where the eval loss first reaches `target`; None if never."""
    previous = None
    for point in curve:
        if point["eval_loss"] <= target:
            if previous is None or previous["eval_loss"] == point["eval_loss"]:
                return float(point[key])
            fraction = (previous["eval_loss"] - target) / (previous["eval_loss"] - point["eval_loss"])
            return float(previous[key] + fraction * (point[key] - previous[key]))
        previous = point
    return None


def compare_with_dense(runs: dict) -> dict:
    dense = runs[BASELINE]
    target = dense["final_eval_loss"]
    comparison = {}
    for name, run in runs.items():
        step = first_crossing(run["curve"], target, "step")
        seconds = first_crossing(run["curve"], target, "train_seconds")
        comparison[name] = {
            "steps_to_dense_final_loss": None if step is None else round(step, 1),
            "steps_ratio": None if step is None else round(step / dense["steps"], 3),
            "time_to_dense_final_loss_s": None if seconds is None else round(seconds, 1),
            "time_ratio": None if seconds is None else round(seconds / dense["train_seconds"], 3),
            "seconds_per_step_ratio": round((run["train_seconds"] / run["steps"])
                                            / (dense["train_seconds"] / dense["steps"]), 3),
        }
    return {"dense_final_eval_loss": target, "runs": comparison}


def bf16_comparison(runs: dict) -> dict:
    return {name: {"full_precision_loss": runs[name]["final_eval_loss"], "bf16_only_loss": runs[bf16]["final_eval_loss"],
                   "degradation": round(runs[bf16]["final_eval_loss"] - runs[name]["final_eval_loss"], 4)}
            for name, bf16 in BF16_PAIRS.items()}


def transition_summary(source: dict, transition_result: dict) -> dict:
    curve = transition_result["curve"]
    at_switch = curve[0]["eval_loss"] if curve and curve[0]["step"] == 0 else None
    final = transition_result["final_eval_loss"]
    mot_final = source["final_eval_loss"]
    recovered_at = first_crossing([p for p in curve if p["step"] > 0], mot_final, "step")
    return {"mot_final_loss": mot_final, "loss_right_after_switch": at_switch,
            "jump": None if at_switch is None else round(at_switch - mot_final, 5),
            "final_loss": final, "extra_steps": transition_result["steps"], "source_steps": source["steps"],
            "steps_to_recover_mot_final_loss": None if recovered_at is None else round(recovered_at, 1)}


def zero_shot(model_dir: Path, data_dir: Path, limit: int, output: Path) -> dict:
    from .evaluation import main as evaluate

    evaluate([str(model_dir), "--tasks", ",".join(ZERO_SHOT_TASKS), "--data_dir", str(data_dir), "--limit",
              str(limit), "--output", str(output), "--device", "cpu" if not _cuda() else "cuda"])
    results = json.loads(output.read_text(encoding="utf-8"))
    scores = {}
    for task in ZERO_SHOT_TASKS:
        metrics = results["results"][task]
        key = "acc_norm,none" if "acc_norm,none" in metrics else "acc,none"
        scores[task] = {"metric": key.split(",")[0], "value": round(float(metrics[key]), 4)}
    meta = results.get("mot_eval", {})
    scores["scoring"] = {k: meta.get(k) for k in ("batch_size", "group_size", "mot_routing", "batch_dependent")}
    return scores


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------ plots
def write_plots(results: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    runs = results["runs"]
    colors = plt.get_cmap("tab20")
    written = []

    def save(figure, name):
        figure.tight_layout()
        figure.savefig(folder / name, dpi=90)
        plt.close(figure)
        written.append(name)

    for key, name, xlabel in (("step", "loss_vs_step.png", "optimizer step"),
                              ("train_seconds", "loss_vs_time.png", "training wall time (s, shared CPU: noisy)")):
        figure, axis = plt.subplots(figsize=(8, 5))
        for index, (run_name, run) in enumerate(runs.items()):
            points = [p for p in run["curve"] if p["step"] > 0]
            axis.plot([p[key] for p in points], [p["eval_loss"] for p in points], label=run_name,
                      color=colors(index % 20), linewidth=2.2 if run_name in (BASELINE, "mot") else 1.2)
        axis.axhline(results["dense_comparison"]["dense_final_eval_loss"], color="black", linestyle=":",
                     linewidth=1, label="dense final loss")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("eval loss (nats/token)")
        axis.set_title(f"Eval loss vs {'step' if key == 'step' else 'training time'}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small", ncol=2)
        save(figure, name)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    source = runs[TRANSITION_SOURCE]
    axis.plot([p["step"] for p in source["curve"]], [p["eval_loss"] for p in source["curve"]], label="MoT")
    offset = source["steps"]
    tuned = results["transition"]["curve"]
    axis.plot([offset + p["step"] for p in tuned], [p["eval_loss"] for p in tuned], marker="o", markersize=3,
              label="Token Choice after transition")
    axis.axvline(offset, color="gray", linestyle="--", linewidth=1)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("eval loss (nats/token)")
    axis.set_title("Transition tuning MoT -> Token Choice (+10% steps)")
    axis.grid(alpha=0.3)
    axis.legend()
    save(figure, "transition.png")

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, (run_name, run) in enumerate(runs.items()):
        series = [p for p in run["routing_entropy"] if p["normalized"] is not None]
        if series:
            axis.plot([p["step"] for p in series], [p["normalized"] for p in series], label=run_name,
                      color=colors(index % 20))
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("mixing entropy / log G")
    axis.set_title("MoT routing entropy (1 = uniform over the group)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    save(figure, "routing_entropy.png")
    return written


# ------------------------------------------------------------------------------------------------ report
def _fmt(value, digits=3, suffix=""):
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{suffix}" if isinstance(value, float) else f"{value}{suffix}"


def _reached(amount, ratio, digits, suffix=""):
    if amount is None:
        return "not reached"
    return _fmt(amount, digits, suffix) + ("" if ratio is None else f" ({_fmt(ratio)})")


def render_markdown(results: dict) -> str:
    budget = results["budget"]
    runs = results["runs"]
    comparison = results["dense_comparison"]["runs"]
    env = results["environment"]
    lines = [
        "# Reproduction results",
        "",
        "_Generated by `mot reproduce` (`python bench/reproduce.py`"
        + (" --smoke" if results["smoke"] else "") + (f" --scale {results['scale']}" if results["scale"] != 1 else "")
        + "); do not edit by hand. See [reproduce.md](reproduce.md) for what is measured and how this small scale "
        "differs from the paper._",
        "",
    ]
    if results["smoke"]:
        lines += ["**SMOKE RUN: a few steps per model. These numbers only show that the pipeline works.**", ""]
    lines += [
        "## Setup",
        "",
        f"- Data: ELTeC-eng novels, {results['data']['train_chars']:,} training characters (the first novels), "
        f"validation on the start of the last {HELD_OUT_NOVELS} novels ({budget['eval_blocks']} blocks); one "
        f"byte-level BPE tokenizer ({budget['vocab_size']} tokens) trained on the training text, shared by all runs.",
        f"- Models: {budget['num_layers']} blocks (routed feed-forward in the second half), d = {budget['hidden_size']}, "
        f"d_ff = {budget['d_ff']}, {budget['num_heads']} heads, context {budget['block_size']}.",
        f"- Schedule (identical for every run): {budget['steps']} steps of {budget['batch_size']} x "
        f"{budget['block_size']} tokens, AdamW, peak LR 7e-4, cosine to 0.1x with warm-up, weight decay 0.1, "
        f"clip 0.5, seed 0; eval every {budget['eval_every']} steps.",
        f"- Machine: {env['machine']}, {env['cpu_count']} CPU cores, torch {env['torch']}, transformers "
        f"{env['transformers']}, device {env['device']}; load average {env['load_average_start']} at the start and "
        f"{env['load_average_end']} at the end. The CPU was shared with other jobs, so **wall times are noisy**. "
        f"Total wall time {results['total_seconds'] / 60:.1f} min.",
        "",
        "## Final losses and speed relative to dense",
        "",
        f"Dense final eval loss: **{results['dense_comparison']['dense_final_eval_loss']:.4f}**. "
        "\"Steps\"/\"time to dense\" = first point (interpolated between evaluations) where a model's eval loss "
        "reaches the dense model's final eval loss, divided by dense's total steps / training time (excluding "
        "evaluation). The paper's claim is about 1/3 for MoT at its scale.",
        "",
        "| run | model | params | final eval loss | steps to dense final loss (ratio) | time to dense final loss "
        "(ratio) | s/step vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        c = comparison[name]
        lines.append(
            f"| {name} | {run['description']} | {run['num_parameters'] / 1e6:.2f}M | {run['final_eval_loss']:.4f} | "
            f"{_reached(c['steps_to_dense_final_loss'], c['steps_ratio'], 0)} | "
            f"{_reached(c['time_to_dense_final_loss_s'], c['time_ratio'], 0, ' s')} | "
            f"{c['seconds_per_step_ratio']:.2f}x |")
    lines += ["", "![eval loss vs step](results/loss_vs_step.png)", "",
              "![eval loss vs time](results/loss_vs_time.png)", "", "## bf16-only vs full-precision weights", "",
              "| model | full-precision weights | bf16-only weights | degradation |", "|---|---|---|---|"]
    for name, row in results["bf16"].items():
        lines.append(f"| {name} | {row['full_precision_loss']:.4f} | {row['bf16_only_loss']:.4f} | "
                     f"{row['degradation']:+.4f} |")
    lines += ["", f"The full-precision runs use {results['precision_reference']}. The paper claims MoT degrades "
              "less than Expert Choice under bf16-only training.", ""]
    t = results["transition_summary"]
    lines += [
        "## Transition tuning MoT -> Token Choice",
        "",
        f"MoT final loss {t['mot_final_loss']:.4f}; right after converting to Token Choice (dropless eval) "
        f"{_fmt(t['loss_right_after_switch'], 4)} (jump {_fmt(t['jump'], 4)}); after {t['extra_steps']} extra steps "
        f"(+{100 * t['extra_steps'] / t['source_steps']:.0f}%) {t['final_loss']:.4f}. The Token Choice model is back "
        f"at the MoT final loss after {_reached(t['steps_to_recover_mot_final_loss'], None, 0, ' steps')} of tuning "
        "(first evaluation at or below it, interpolated). Optimizer state and LR schedule are continued from the MoT "
        "run; note that the MoT model itself would also have improved somewhat with the same extra steps.",
        "",
        "![transition](results/transition.png)",
        "",
        "## Sweeps",
        "",
        "| sweep | run | group size | experts | params | final eval loss |",
        "|---|---|---|---|---|---|",
    ]
    for sweep, names in (("group size (flop-matched, E = G)", GROUP_SWEEP), ("temperature", TEMPERATURE_SWEEP)):
        for name in names:
            run = runs[name]
            lines.append(f"| {sweep} | {name} | {run['group_size']} | {run['num_experts']} | "
                         f"{run['num_parameters'] / 1e6:.2f}M | {run['final_eval_loss']:.4f} |")
    lines += ["", "![routing entropy](results/routing_entropy.png)", "", "## Zero-shot", "",
              f"lm-evaluation-harness stock tasks from the local `--data_dir` copies, first {budget['zero_shot_limit']} "
              "documents of each (acc_norm where the task has it, else acc). MoT scores are batch-dependent: "
              "scored with masks and fixed groups (`mot eval`'s MoT backend); the transition-tuned Token Choice "
              "model is batch-invariant.", "",
              "| model | " + " | ".join(ZERO_SHOT_TASKS) + " | mean |", "|---|" + "---|" * (len(ZERO_SHOT_TASKS) + 1)]
    for name, scores in results["zero_shot"].items():
        values = [scores[task]["value"] for task in ZERO_SHOT_TASKS]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values)
                     + f" | {sum(values) / len(values):.3f} |")
    lines += ["", "## Where this differs from the paper", ""] + [f"- {note}" for note in results["caveats"]] + [""]
    return "\n".join(lines)


def caveats(budget: Budget, smoke: bool) -> list[str]:
    notes = [
        f"Scale: {budget.steps} steps x {budget.tokens_per_step:,} tokens (~{budget.steps * budget.tokens_per_step / 1e6:.1f}M "
        "tokens) on a few-million-parameter model, versus 150K steps x 65K tokens (~10B tokens) on 77M-1B parameter "
        "models in the paper. Early in training the ranking of models can differ from the converged ranking.",
        "Data: 19th-century novels with a small BPE vocabulary instead of C4 with GPT-2's tokenizer.",
        "Group size 8 (and the /16 setting with 128 experts of width d_ff/16) instead of 32: a batch of 32 "
        "sequences allows at most one group of 32.",
        "Zero-shot: models this small score near chance (PIQA 0.5, HellaSwag 0.25, ARC-Easy ~0.25), and a small "
        "--limit gives wide confidence intervals; treat differences of a few points as noise.",
        "Times are measured on a CPU shared with other jobs; the time ratios mix model cost with machine load. "
        "Layer speed is measured separately by bench/layer.py.",
        "The group-size sweep keeps FLOPs matched (E = G, f = d_ff), so parameters grow with G, as in the paper's "
        "scaling of experts; it cannot keep both parameters and FLOPs fixed.",
    ]
    if smoke:
        notes.insert(0, "This is a smoke run (a few steps): no claim can be judged from it.")
    return notes


def environment(device: str) -> dict:
    import torch
    import transformers

    return {"machine": platform.processor() or platform.machine(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": device, "python": platform.python_version()}


def _load_average() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


# ------------------------------------------------------------------------------------------------ command
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mot reproduce",
        description="Small-scale reproduction of the Mixture of Tokens paper's claims: trains dense, MoT, Token "
                    "Choice and Expert Choice models on the same data and schedule, runs the bf16, transition, "
                    "group-size and temperature experiments and zero-shot evals, and writes results.json, plots "
                    "and results.md.")
    parser.add_argument("--output_dir", type=Path, default=None,
                        help=f"where runs, results.json, results.md and plots go (default {DEFAULT_OUTPUT_DIR}; "
                             "with the default, results.md and its plots are also copied to docs/)")
    parser.add_argument("--smoke", action="store_true", help="a few steps per model: checks the pipeline (~25 s on 2 CPU cores)")
    parser.add_argument("--scale", type=int, default=1,
                        help="grow width, context, vocabulary and steps N-fold (for a GPU); default 1")
    parser.add_argument("--data_dir", type=Path, default=None,
                        help="shared data folder holding eltec_eng/ and the zero-shot tasks (default ../shared/data "
                             "or $MOT_SHARED_DATA)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps per run")
    parser.add_argument("--zero_shot_limit", type=int, default=None,
                        help="documents per zero-shot task (default 50 x scale; smoke 2)")
    docs = parser.add_mutually_exclusive_group()
    docs.add_argument("--update_docs", dest="update_docs", action="store_true", default=None,
                      help="copy results.md and its plots to docs/ (default: only with the default --output_dir)")
    docs.add_argument("--no_update_docs", dest="update_docs", action="store_false")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished runs recorded in --output_dir (same budget) and do only the rest")
    parser.add_argument("--report_only", action="store_true",
                        help="train nothing: redraw the plots and results.md from --output_dir's results.json")
    return parser


def check_arguments(args) -> None:
    if args.report_only:
        if not (args.output_dir / "results.json").is_file():
            raise UserError(f"--report_only: no results.json in {args.output_dir}; run the reproduction first")
        return
    if args.scale < 1:
        raise UserError(f"--scale must be a positive integer, got {args.scale}")
    for name in ("steps", "zero_shot_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be a positive integer, got {value}")
    if args.smoke and args.scale != 1:
        raise UserError("--smoke and --scale exclude each other: the smoke run has its own tiny size")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise UserError(f"--output_dir {args.output_dir} exists and is a file")
    if args.output_dir.is_dir() and any(args.output_dir.iterdir()) and not (args.overwrite or args.resume):
        raise UserError(f"--output_dir {args.output_dir} is not empty; pass --overwrite to replace its results or "
                        "--resume to finish an interrupted reproduction")
    if not (args.data_dir / CORPUS).is_file():
        raise UserError(f"no novels corpus at {args.data_dir / CORPUS}; pass --data_dir pointing at shared/data")
    from . import eval_data

    eval_data.check_data_dir(args.data_dir, list(ZERO_SHOT_TASKS))


def progress(message: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    default_output = args.output_dir is None
    args.output_dir = (args.output_dir or DEFAULT_OUTPUT_DIR).resolve()
    args.data_dir = (args.data_dir or default_data_dir()).resolve()
    check_arguments(args)
    update_docs = args.update_docs if args.update_docs is not None else (default_output and not args.smoke)
    if args.report_only:
        results = json.loads((args.output_dir / "results.json").read_text(encoding="utf-8"))
        write_report(results, args.output_dir, update_docs)
        return 0
    budget = make_budget(args.scale, args.smoke, args.steps, args.zero_shot_limit)
    started = time.perf_counter()
    load_start = _load_average()
    out = args.output_dir
    records = RunRecords(out / "run_records", budget)
    if args.resume and records.budget_matches():
        progress(f"resuming: keeping {', '.join(records.names()) or 'no finished run'}")
    elif out.exists():
        shutil.rmtree(out)
    records.start()

    progress(f"budget: {budget}")
    train_file, valid_file, tokenizer_dir = out / "data" / "train.txt", out / "data" / "valid.txt", out / "tokenizer"
    if not (records.names() and (tokenizer_dir / "tokenizer.json").is_file() and valid_file.is_file()):
        train_file, valid_file = prepare_data(args.data_dir, out / "data", budget)
        tokenizer_dir = train_shared_tokenizer(train_file, tokenizer_dir, budget.vocab_size)
    progress(f"data and a {budget.vocab_size}-token tokenizer ready in {out}")
    common = common_train_flags(budget, train_file, valid_file, tokenizer_dir)
    runs_dir = out / "runs"
    runs: dict[str, dict] = {}
    for index, spec in enumerate(RUNS, start=1):
        if records.has(spec.name):
            runs[spec.name] = records.get(spec.name)
            continue
        progress(f"run {index}/{len(RUNS)} {spec.name}: {spec.description}, {budget.steps} steps")
        runs[spec.name] = records.put(spec.name, train_run(spec, budget, common, runs_dir,
                                                           save_checkpoint=spec.name == TRANSITION_SOURCE))
        elapsed = time.perf_counter() - started
        progress(f"{spec.name}: final eval loss {runs[spec.name]['final_eval_loss']:.4f}, "
                 f"{runs[spec.name]['train_seconds']:.0f} s training; {elapsed / 60:.1f} min elapsed, about "
                 f"{elapsed / index * (len(RUNS) - index) / 60:.0f} min of training left")
    progress(f"transition tuning {TRANSITION_SOURCE} -> Token Choice (+{TRANSITION_FRACTION:.0%} steps)")
    transition_result = (records.get(TRANSITION) if records.has(TRANSITION) else
                         records.put(TRANSITION, transition_run(runs_dir / TRANSITION_SOURCE, budget, runs_dir)))

    zero_shot_models = [spec.name for spec in RUNS if spec.zero_shot] + [TRANSITION]
    scores = {}
    for index, name in enumerate(zero_shot_models, start=1):
        key = f"zero_shot_{name}"
        if not records.has(key):
            progress(f"zero-shot {index}/{len(zero_shot_models)}: {name} (limit {budget.zero_shot_limit})")
            records.put(key, zero_shot(runs_dir / name, args.data_dir, budget.zero_shot_limit,
                                       out / "zero_shot" / f"{name}.json"))
        scores[name] = records.get(key)

    device = "cuda" if _cuda() else "cpu"
    results = {
        "smoke": args.smoke, "scale": args.scale, "budget": {**asdict(budget), "tokens_per_step": budget.tokens_per_step},
        "data": {"corpus": str(args.data_dir / CORPUS), "train_file": str(train_file), "valid_file": str(valid_file),
                 "train_chars": train_file.stat().st_size, "tokenizer": str(tokenizer_dir)},
        "precision_reference": ("fp32 weights with bf16 autocast" if device == "cuda" else
                                "fp32 weights without autocast (CPU: `mot train`'s default; bf16 autocast is off)"),
        "runs": runs,
        "transition": transition_result,
        "zero_shot": scores,
        "caveats": caveats(budget, args.smoke),
    }
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["environment"] = {**environment(device), "load_average_start": load_start,
                              "load_average_end": _load_average()}
    write_report(results, out, update_docs)
    progress(f"finished in {results['total_seconds'] / 60:.1f} min")
    return 0


def write_report(results: dict, out: Path, update_docs: bool) -> None:
    """The comparisons, plots, results.json and results.md in `out` (and a copy of results.md and the plots in
    docs/). Everything derived is recomputed from the runs, so `--report_only` picks up changes of the analysis."""
    runs = results["runs"]
    results["dense_comparison"] = compare_with_dense(runs)
    results["bf16"] = bf16_comparison(runs)
    results["transition_summary"] = transition_summary(runs[TRANSITION_SOURCE], results["transition"])
    results["plots"] = [f"{PLOTS_FOLDER}/{name}" for name in write_plots(results, out / PLOTS_FOLDER)]
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(render_markdown(results), encoding="utf-8")
    progress(f"wrote {out / 'results.json'}, {out / 'results.md'} and {len(results['plots'])} plots")
    if update_docs:
        copy_to_docs(out)
        progress(f"copied results.md and plots to {DOCS_DIR}")


def copy_to_docs(out: Path) -> None:
    (DOCS_DIR / PLOTS_FOLDER).mkdir(parents=True, exist_ok=True)
    for name in PLOT_FILES:
        shutil.copyfile(out / PLOTS_FOLDER / name, DOCS_DIR / PLOTS_FOLDER / name)
    shutil.copyfile(out / "results.md", DOCS_DIR / "results.md")


__all__ = ["main", "RUNS", "Budget", "make_budget", "first_crossing"]
