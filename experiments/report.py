"""What the reproduction measured, as results.json, PNG plots and results.md (`python -m experiments`,
`--report_only`).

Everything here is computed from the run records, so `python -m experiments --report_only` picks up a change of the
analysis without training anything. A difference between two models is called real only where it exceeds the
spread between seeds (docs/reproduce.md).
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from .plan import (
    AUTHORS,
    BF16,
    BF16_PAIRS,
    EXTRAS,
    GROUP_SIZE,
    MAIN,
    MAIN_MODELS,
    MANY_EXPERTS,
    MODELS,
    ROUTED_WEIGHT,
    ROUTED_WEIGHT_MODELS,
    SWEEP,
    TEMPERATURE,
    Plan,
    Run,
)

ZERO_SHOT_TASKS = ("piqa", "hellaswag", "arc_easy")
DRAWN_MODELS = (*MAIN_MODELS, *ROUTED_WEIGHT_MODELS)  # the models the loss and routing plots draw, in color order
PLOTS_FOLDER = "results"  # beside results.md, so the same relative links work in the output dir and in docs/
PLOT_FILES = ("loss_vs_step.png", "loss_vs_time.png", "lr_sweep.png", "routing.png", "transition.png")
# Differences reported per width: (name, model, reference)
DIFFERENCES = (("MoT - dense", "mot", "dense"), ("MoT - uniform", "mot", "mot_uniform"),
               ("Token Choice - dense", "token_choice", "dense"), ("Expert Choice - dense", "expert_choice", "dense"),
               ("MoT (all blocks) - dense", "mot_all", "dense"),
               ("MoT (all blocks) - uniform (all blocks)", "mot_all", "mot_all_uniform"))


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


def spread(values: list[float]) -> float | None:
    """max - min over seeds (None with one seed)."""
    return max(values) - min(values) if len(values) > 1 else None


class Collected:
    """The records of a plan, looked up by model, width and seed."""

    def __init__(self, plan: Plan, records):
        self.plan, self.records = plan, records
        self.learning_rates = {}
        for width in plan.budget.widths:
            sweep = [r for r in plan.sweep(width.hidden_size) if records.has(r.key)]
            if sweep and len(sweep) == len(plan.sweep(width.hidden_size)):
                best = min(sweep, key=lambda r: records.get(r.key)["final_eval_loss"])
                self.learning_rates[width.hidden_size] = best.learning_rate

    def record(self, run: Run) -> dict | None:
        return self.records.get(run.key) if self.records.has(run.key) else None

    def runs(self, model: str, width: int, sections=(MAIN, ROUTED_WEIGHT, AUTHORS)) -> list[dict]:
        """The records of `model` at `width` over its seeds, seed order."""
        found = []
        for run in self.plan.runs:
            if run.model == model and run.width == width and run.section in sections:
                record = self.record(run)
                if record is not None:
                    found.append(record)
        return sorted(found, key=lambda r: r["seed"])

    def extra(self, model: str) -> dict | None:
        run = next((r for r in self.plan.runs if r.model == model and r.steps == self.plan.budget.extra_steps
                    and r.section not in (SWEEP, MAIN, ROUTED_WEIGHT, AUTHORS)), None)
        return None if run is None else self.record(run)


def model_summary(runs: list[dict]) -> dict:
    losses = [r["final_eval_loss"] for r in runs]
    return {"seeds": [r["seed"] for r in runs], "final_eval_losses": [round(v, 4) for v in losses],
            "mean": round(statistics.fmean(losses), 4), "spread": None if spread(losses) is None else round(spread(losses), 4),
            "num_parameters": runs[0]["num_parameters"], "description": runs[0]["description"],
            "train_seconds": [r["train_seconds"] for r in runs]}


def comparison(collected: Collected) -> dict:
    """Per width: each model's mean and spread over seeds, and the differences with their paired spread. A
    difference is real where |mean| exceeds the larger seed spread of its two models; at a width with one seed,
    the spread measured at the first width stands in (and the table says so)."""
    widths = {}
    reference_noise = None
    for width in collected.plan.budget.widths:
        models = {}
        for name in dict.fromkeys(run.model for run in collected.plan.runs
                                  if run.width == width.hidden_size and run.section in (MAIN, ROUTED_WEIGHT)):
            runs = collected.runs(name, width.hidden_size, (MAIN, ROUTED_WEIGHT))
            if runs:
                models[name] = model_summary(runs)
        spreads = [m["spread"] for m in models.values() if m["spread"] is not None]
        noise = max(spreads) if spreads else None
        if reference_noise is None:
            reference_noise = noise
        differences = {}
        for label, model, reference in DIFFERENCES:
            if model not in models or reference not in models:
                continue
            ours = dict(zip(models[model]["seeds"], models[model]["final_eval_losses"], strict=True))
            theirs = dict(zip(models[reference]["seeds"], models[reference]["final_eval_losses"], strict=True))
            paired = [ours[seed] - theirs[seed] for seed in ours if seed in theirs]
            own_noise = max([s for s in (models[model]["spread"], models[reference]["spread"]) if s is not None],
                            default=None)
            threshold = own_noise if own_noise is not None else reference_noise
            mean = statistics.fmean(paired)
            differences[label] = {
                "per_seed": [round(v, 4) for v in paired], "mean": round(mean, 4),
                "threshold": None if threshold is None else round(threshold, 4),
                "threshold_from": "these seeds" if own_noise is not None else "first width's seeds",
                "real": None if threshold is None else abs(mean) > threshold,
            }
        widths[str(width.hidden_size)] = {
            "learning_rate": collected.learning_rates.get(width.hidden_size), "models": models,
            "seed_noise": None if noise is None else round(noise, 4), "differences": differences,
            "time_to_dense": time_to_dense(collected, width.hidden_size),
        }
    return widths


def time_to_dense(collected: Collected, width: int) -> dict:
    """Steps and training time (over dense's) at which each seed-0 model first reaches dense's final loss."""
    runs = {name: collected.runs(name, width, (MAIN, ROUTED_WEIGHT)) for name in MODELS}
    runs = {name: found[0] for name, found in runs.items() if found and found[0]["seed"] == 0}
    if "dense" not in runs:
        return {}
    dense = runs["dense"]
    target = dense["final_eval_loss"]
    table = {}
    for name, run in runs.items():
        step = first_crossing(run["curve"], target, "step")
        seconds = first_crossing(run["curve"], target, "train_seconds")
        table[name] = {"steps_ratio": None if step is None else round(step / dense["steps"], 3),
                       "time_ratio": None if seconds is None else round(seconds / dense["train_seconds"], 3),
                       "seconds_per_step_ratio": round((run["train_seconds"] / run["steps"])
                                                       / (dense["train_seconds"] / dense["steps"]), 3)}
    return table


def sweep_table(collected: Collected) -> dict:
    table = {}
    for width in collected.plan.budget.widths:
        rows = [{"learning_rate": run.learning_rate, "final_eval_loss": collected.record(run)["final_eval_loss"]}
                for run in collected.plan.sweep(width.hidden_size) if collected.record(run)]
        table[str(width.hidden_size)] = {"runs": rows, "chosen": collected.learning_rates.get(width.hidden_size)}
    return table


def routing_table(collected: Collected) -> dict:
    """For the seed-0 MoT runs of each width: per layer, normalised mixing entropy and weight on the top token at
    the first log, halfway and at the end of training."""
    table = {}
    for width in collected.plan.budget.widths:
        for name in ("mot", "mot_all", "mot_authors"):
            runs = collected.runs(name, width.hidden_size)
            if not runs or not runs[0]["routing"]:
                continue
            series = runs[0]["routing"]
            points = {"first": series[0], "middle": series[len(series) // 2], "last": series[-1]}
            layers = {layer: {when: {"step": point["step"],
                                     "normalized_entropy": point["layers"][layer]["normalized_entropy"],
                                     "max_weight": point["layers"][layer].get("max_weight")}
                              for when, point in points.items()}
                      for layer in series[-1]["layers"]}
            table[f"{width.hidden_size}/{name}"] = {"group_size": runs[0]["group_size"], "layers": layers}
    return table


def authors_table(collected: Collected) -> dict | None:
    width = collected.plan.budget.widths[0].hidden_size
    found = {name: collected.runs(name, width) for name in ("dense", "mot", "dense_authors", "mot_authors")}
    if not all(found.values()):
        return None
    loss = {name: runs[0]["final_eval_loss"] for name, runs in found.items()}  # seed 0
    return {"width": width, "losses": {k: round(v, 4) for k, v in loss.items()},
            "mot_minus_dense_ours": round(loss["mot"] - loss["dense"], 4),
            "mot_minus_dense_authors": round(loss["mot_authors"] - loss["dense_authors"], 4)}


def extras_table(collected: Collected) -> dict:
    table = {"steps": collected.plan.budget.extra_steps, "width": collected.plan.budget.widths[0].hidden_size}
    for section in (BF16, GROUP_SIZE, TEMPERATURE, MANY_EXPERTS):
        rows = {}
        for name in EXTRAS[section]:
            record = collected.extra(name)
            if record is not None:
                rows[name] = {"description": record["description"], "final_eval_loss": round(record["final_eval_loss"], 4),
                              "num_parameters": record["num_parameters"], "group_size": record["group_size"],
                              "num_experts": record["num_experts"]}
        table[section] = rows
    table["bf16_degradation"] = {name: round(table[BF16][bf16]["final_eval_loss"] - table[BF16][name]["final_eval_loss"], 4)
                                 for name, bf16 in BF16_PAIRS.items() if name in table[BF16] and bf16 in table[BF16]}
    return table


def transition_summary(collected: Collected) -> dict | None:
    job = collected.plan.transition
    if not (collected.records.has(job.key) and collected.record(job.source)):
        return None
    source, tuned = collected.record(job.source), collected.records.get(job.key)
    curve = tuned["curve"]
    at_switch = curve[0]["eval_loss"] if curve and curve[0]["step"] == 0 else None
    recovered_at = first_crossing([p for p in curve if p["step"] > 0], source["final_eval_loss"], "step")
    return {"source": job.source.key, "mot_final_loss": source["final_eval_loss"], "loss_right_after_switch": at_switch,
            "jump": None if at_switch is None else round(at_switch - source["final_eval_loss"], 5),
            "final_loss": tuned["final_eval_loss"], "extra_steps": tuned["steps"], "source_steps": source["steps"],
            "optimizer_continued": tuned["optimizer_continued"], "curve": curve, "source_curve": source["curve"],
            "steps_to_recover_mot_final_loss": None if recovered_at is None else round(recovered_at, 1)}


def zero_shot_table(collected: Collected) -> dict:
    table = {}
    jobs = [(f"{run.key}-zero_shot", f"w{run.width} {run.model}") for run in collected.plan.zero_shot]
    jobs.append((f"{collected.plan.transition.key}-zero_shot", f"w{collected.plan.transition.source.width} "
                 "transition-tuned Token Choice"))
    for key, label in jobs:
        if collected.records.has(key):
            table[label] = collected.records.get(key)
    return table


def collect(plan: Plan, records) -> dict:
    collected = Collected(plan, records)
    manifest = records.manifest() or {}
    sessions = manifest.get("sessions", [])
    return {
        "smoke": manifest.get("smoke", False), "budget": plan.budget.as_dict(), "data": manifest.get("data", {}),
        "sessions": sessions, "total_seconds": round(sum(s.get("seconds", 0) for s in sessions), 1),
        "recorded_jobs": len(records.keys()),
        "expected_keys": [run.key for run in plan.runs] + [plan.transition.key]
        + [f"{run.key}-zero_shot" for run in plan.zero_shot] + [f"{plan.transition.key}-zero_shot"],
        "recorded_keys": records.keys(),
        "skipped": {name: why for session in sessions for name, why in session.get("skipped", {}).items()},
        "learning_rate_sweep": sweep_table(collected), "comparison": comparison(collected),
        "routing": routing_table(collected), "authors_wrapper": authors_table(collected),
        "extras": extras_table(collected), "transition": transition_summary(collected),
        "zero_shot": zero_shot_table(collected), "curves": curves(collected),
    }


def curves(collected: Collected) -> dict:
    """Eval-loss curves and routing series of the runs the plots draw (seed 0 and 1 of the comparison)."""
    drawn = {}
    for width in collected.plan.budget.widths:
        for name in DRAWN_MODELS:
            for run in collected.runs(name, width.hidden_size, (MAIN, ROUTED_WEIGHT)):
                drawn[f"{width.hidden_size}/{name}/s{run['seed']}"] = {"curve": run["curve"], "routing": run["routing"]}
    return drawn


# ------------------------------------------------------------------------------------------------ plots
def write_plots(results: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    widths = list(results["comparison"])
    colors = {name: plt.get_cmap("tab10")(index) for index, name in enumerate(DRAWN_MODELS)}
    written = []

    def save(figure, name):
        figure.tight_layout()
        figure.savefig(folder / name, dpi=90)
        plt.close(figure)
        written.append(name)

    for key, name, xlabel in (("step", "loss_vs_step.png", "optimizer step"),
                              ("train_seconds", "loss_vs_time.png", "training time (s; runs side by side, noisy)")):
        figure, axes = plt.subplots(1, len(widths), figsize=(6.5 * len(widths), 4.8), squeeze=False)
        for axis, width in zip(axes[0], widths, strict=True):
            for label, drawn in results["curves"].items():
                drawn_width, model, seed = label.split("/")
                if drawn_width != width:
                    continue
                points = [p for p in drawn["curve"] if p["step"] > 0]
                points = points[len(points) // 4:]  # the first quarter's losses would flatten the rest
                axis.plot([p[key] for p in points], [p["eval_loss"] for p in points], color=colors[model],
                          linestyle="-" if seed == "s0" else "--", linewidth=1.4,
                          label=model if seed == "s0" else None)
            axis.set_title(f"width {width} (dashed: seed 1)")
            axis.set_xlabel(xlabel)
            axis.set_ylabel("eval loss (nats/token)")
            axis.grid(alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize="small")
        save(figure, name)

    figure, axis = plt.subplots(figsize=(6, 4.2))
    for width, sweep in results["learning_rate_sweep"].items():
        rows = sorted(sweep["runs"], key=lambda row: row["learning_rate"])
        axis.plot([r["learning_rate"] for r in rows], [r["final_eval_loss"] for r in rows], marker="o",
                  label=f"dense, width {width}")
    axis.set_xscale("log")
    axis.set_xlabel("peak learning rate")
    axis.set_ylabel("final eval loss")
    axis.set_title("Learning-rate sweep (dense)")
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend()
    save(figure, "lr_sweep.png")

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, drawn in results["curves"].items():
        width, model, seed = label.split("/")
        if seed != "s0" or not drawn["routing"] or "uniform" in model:
            continue
        for layer in drawn["routing"][-1]["layers"]:
            series = [(p["step"], p["layers"][layer]) for p in drawn["routing"] if layer in p["layers"]]
            style = dict(linestyle="-" if width == widths[0] else "--", linewidth=1.2)
            axes[0].plot([s for s, _ in series], [v["normalized_entropy"] for _, v in series],
                         label=f"w{width} {model} layer {layer}", **style)
            axes[1].plot([s for s, _ in series], [v.get("max_weight") for _, v in series], **style)
    axes[0].set_title("MoT mixing entropy / log G (1 = uniform)")
    axes[1].set_title("mean weight on the group's top token (1/G = uniform)")
    for axis in axes:
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize="x-small", ncol=2)
    save(figure, "routing.png")

    figure, axis = plt.subplots(figsize=(7, 4.5))
    transition = results["transition"]
    if transition:
        source = transition["source_curve"]
        axis.plot([p["step"] for p in source], [p["eval_loss"] for p in source], label="MoT")
        offset = transition["source_steps"]
        axis.plot([offset + p["step"] for p in transition["curve"]], [p["eval_loss"] for p in transition["curve"]],
                  marker="o", markersize=3, label="Token Choice after transition")
        axis.axvline(offset, color="gray", linestyle="--", linewidth=1)
        axis.legend()
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("eval loss (nats/token)")
    axis.set_title("Transition tuning MoT -> Token Choice (+10% steps)")
    axis.grid(alpha=0.3)
    save(figure, "transition.png")
    return written


# ------------------------------------------------------------------------------------------------ markdown
def _fmt(value, digits=4, signed=False):
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def across_widths(comparison: dict) -> list[str]:
    """One row per difference, one column per width: how each difference moves as the model grows."""
    widths = list(comparison)
    labels = [label for label, _, _ in DIFFERENCES if any(label in comparison[w]["differences"] for w in widths)]
    if len(widths) < 2 or not labels:
        return []
    lines = ["### Across widths", "",
             "Mean difference in final eval loss (negative: the first model is better), the seed spread it must "
             "exceed (at a width with one seed, the first width's), and whether it does.", "",
             "| difference | " + " | ".join(f"width {width}" for width in widths) + " |",
             "|---|" + "---|" * len(widths)]
    for label in labels:
        cells = []
        for width in widths:
            diff = comparison[width]["differences"].get(label)
            if diff is None:
                cells.append("not run")
                continue
            verdict = "n/a" if diff["real"] is None else ("**real**" if diff["real"] else "within")
            cells.append(f"{diff['mean']:+.4f} (spread {_fmt(diff['threshold'])}: {verdict})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_markdown(results: dict) -> str:
    budget = results["budget"]
    lines = ["# Reproduction results", "",
             "_Generated by `python -m experiments" + (" --smoke" if results["smoke"] else "")
             + "`; do not edit by hand. [reproduce.md](reproduce.md) says what is measured, why, and how this "
             "scale differs from the paper._", ""]
    if results["smoke"]:
        lines += ["**SMOKE RUN: a few steps per model. These numbers only show that the pipeline works.**", ""]
    missing = [key for key in results["expected_keys"] if key not in results["recorded_keys"]]
    if missing:
        lines += [f"**PARTIAL: {len(results['expected_keys']) - len(missing)} of {len(results['expected_keys'])} jobs "
                  f"recorded so far; `python -m experiments --resume` trains the rest ({', '.join(missing[:4])}"
                  f"{', ...' if len(missing) > 4 else ''}). Tables show what is recorded.**", ""]
    sessions = results["sessions"]
    env = sessions[-1]["environment"] if sessions else {}
    widths = ", ".join(f"{w['hidden_size']} ({w['num_heads']} heads, d_ff {w['d_ff']}, seeds "
                       f"{', '.join(map(str, w['seeds']))})" for w in budget["widths"])
    tokens = budget["steps"] * budget["tokens_per_step"]
    lines += [
        "## Setup", "",
        f"- Data: ELTeC-eng novels, {results['data'].get('train_chars', 0):,} training characters (the first novels, "
        f"no text repeated), validation on the start of the last 3 novels ({budget['eval_blocks']} blocks of "
        f"{budget['block_size']} tokens); one byte-level BPE tokenizer ({budget['vocab_size']} tokens) trained on the "
        "training text, shared by all runs.",
        f"- Models: {budget['num_layers']} blocks, widths {widths}; routed feed-forward layers in the upper half of "
        f"the blocks (the paper's layout) or, where named \"all\", in every block. G = E = {budget['group_size']}, "
        "f = d_ff: every routed model has the dense model's FLOPs per token.",
        f"- Schedule: {budget['steps']:,} steps of {budget['batch_size']} x {budget['block_size']} tokens "
        f"(**{tokens / 1e6:.1f}M tokens per run**), `mot train`'s recipe (AdamW, cosine to 0.1x after warm-up, weight "
        "decay 0.1, clipping 0.5) with the peak learning rate of the dense sweep below; eval every "
        f"{budget['eval_every']} steps. A seed sets both the initialisation and the data order.",
        f"- Machine: {env.get('cpu', env.get('machine', '?'))}, {env.get('cpu_count', '?')} CPU cores"
        f"{'' if env.get('native_bf16', True) else ' (no native bf16)'}, torch {env.get('torch', '?')}, "
        f"transformers {env.get('transformers', '?')}, device {env.get('device', '?')}; runs trained "
        f"{sessions[-1]['workers'] if sessions else '?'} at a time, {sessions[-1]['threads'] if sessions else '?'} "
        f"thread(s) each. Wall time of the whole reproduction: **{results['total_seconds'] / 60:.0f} min** over "
        f"{len(sessions)} sitting(s) ({results['recorded_jobs']} recorded jobs).",
        "",
        f"## Learning rate (dense sweep, {budget['sweep_steps']:,} steps, seed 0)", "",
        "| width | peak LR | final eval loss | chosen |", "|---|---|---|---|",
    ]
    for width, sweep in results["learning_rate_sweep"].items():
        for row in sorted(sweep["runs"], key=lambda r: r["learning_rate"]):
            chosen = "**yes**" if row["learning_rate"] == sweep["chosen"] else ""
            lines.append(f"| {width} | {row['learning_rate']:g} | {row['final_eval_loss']:.4f} | {chosen} |")
    lines += ["", f"The sweep runs a quarter-length schedule ({budget['sweep_steps']:,} steps, its own warm-up and "
              "cosine); every other model of a width trains with that width's chosen rate.", "", "![learning-rate sweep]"
              "(results/lr_sweep.png)", "", "## Main comparison", ""]
    for width, block in results["comparison"].items():
        rate = "n/a" if block["learning_rate"] is None else f"{block['learning_rate']:g}"
        lines += [f"### Width {width} (peak LR {rate})",
                  "", "| model | params | final eval loss per seed | mean | spread (max - min) |", "|---|---|---|---|---|"]
        for name, model in block["models"].items():
            lines.append(f"| {name} | {model['num_parameters'] / 1e6:.2f}M | "
                         f"{', '.join(f'{v:.4f}' for v in model['final_eval_losses'])} | {model['mean']:.4f} | "
                         f"{_fmt(model['spread'])} |")
        lines += ["", "| difference | per seed | mean | spread it must exceed | real? |", "|---|---|---|---|---|"]
        for label, diff in block["differences"].items():
            verdict = "n/a" if diff["real"] is None else ("**yes**" if diff["real"] else "no (within the spread)")
            source = "" if diff["threshold_from"] == "these seeds" else " (first width's seeds)"
            lines.append(f"| {label} | {', '.join(f'{v:+.4f}' for v in diff['per_seed'])} | {diff['mean']:+.4f} | "
                         f"{_fmt(diff['threshold'])}{source} | {verdict} |")
        if block["time_to_dense"]:
            lines += ["", "Seed 0, relative to dense: steps and training time at which the model first reaches "
                      "dense's final eval loss (interpolated between evaluations; the paper's claim for MoT is about "
                      "1/3 at its scale), and training time per step.", "",
                      "| model | steps to dense final loss | time to dense final loss | s/step vs dense |",
                      "|---|---|---|---|"]
            for name, row in block["time_to_dense"].items():
                lines.append(f"| {name} | {_fmt(row['steps_ratio'], 3) if row['steps_ratio'] else 'not reached'} | "
                             f"{_fmt(row['time_ratio'], 3) if row['time_ratio'] else 'not reached'} | "
                             f"{row['seconds_per_step_ratio']:.2f}x |")
        lines.append("")
    lines += across_widths(results["comparison"])
    lines += ["![eval loss vs step](results/loss_vs_step.png)", "", "![eval loss vs time](results/loss_vs_time.png)",
              "", "## What the routing does", "",
              "MoT's mixing weights per routed layer (seed 0): entropy over log G (1 = every token of the group "
              "weighted 1/G, lower = sharper) and the mean weight on the group's top token (1/G = uniform), at the "
              "first log, halfway and at the end.", "",
              "| run | layer | entropy / log G: first, middle, last | top-token weight: first, middle, last |",
              "|---|---|---|---|"]
    for name, block in results["routing"].items():
        for layer, points in block["layers"].items():
            entropy = ", ".join(_fmt(points[w]["normalized_entropy"], 3) for w in ("first", "middle", "last"))
            weight = ", ".join(_fmt(points[w]["max_weight"], 3) for w in ("first", "middle", "last"))
            lines.append(f"| {name} | {layer} | {entropy} | {weight} |")
    lines += ["", "![routing](results/routing.png)", ""]
    authors = results["authors_wrapper"]
    if authors:
        lines += ["## The authors' wrapper: embedding initialisation and final norm", "",
                  f"Width {authors['width']}, seed 0. With their embedding init (truncated normal of std sqrt(0.1) cut "
                  "at +-0.2, std about 0.11) and no final LayerNorm before the head:", "",
                  "| | dense | MoT | MoT - dense |", "|---|---|---|---|",
                  f"| ours | {authors['losses']['dense']:.4f} | {authors['losses']['mot']:.4f} | "
                  f"{authors['mot_minus_dense_ours']:+.4f} |",
                  f"| the authors' | {authors['losses']['dense_authors']:.4f} | {authors['losses']['mot_authors']:.4f} "
                  f"| {authors['mot_minus_dense_authors']:+.4f} |", ""]
    extras = results["extras"]
    lines += ["## Extra experiments (shorter schedule)", "",
              f"Width {extras['width']}, seed 0, **{extras['steps']} steps** each (the budget left after the main "
              "comparison), references retrained on the same schedule.", "",
              "| experiment | run | G | E | params | final eval loss |", "|---|---|---|---|---|---|"]
    for section in (BF16, GROUP_SIZE, TEMPERATURE, MANY_EXPERTS):
        for name, row in extras[section].items():
            lines.append(f"| {section} | {name} | {row['group_size']} | {row['num_experts']} | "
                         f"{row['num_parameters'] / 1e6:.2f}M | {row['final_eval_loss']:.4f} |")
    for section, why in results["skipped"].items():
        lines += ["", f"**Not run: the {section} experiment.** {why[0].upper() + why[1:]}."]
    if extras["bf16_degradation"]:
        lines += ["", "bf16-only weights minus full precision: " + ", ".join(
            f"{name} {value:+.4f}" for name, value in extras["bf16_degradation"].items())
            + " (the paper: MoT degrades less than Expert Choice)."]
    transition = results["transition"]
    if transition:
        lines += ["", "## Transition tuning MoT -> Token Choice", "",
                  f"From `{transition['source']}`: MoT final loss {transition['mot_final_loss']:.4f}; right after "
                  f"converting to Token Choice (dropless eval) {_fmt(transition['loss_right_after_switch'])} (jump "
                  f"{_fmt(transition['jump'], signed=True)}); after {transition['extra_steps']} extra steps (+10%) "
                  f"{transition['final_loss']:.4f}; back at the MoT final loss after "
                  + ("not reached" if transition["steps_to_recover_mot_final_loss"] is None
                     else f"{transition['steps_to_recover_mot_final_loss']:.0f} steps")
                  + ". The optimizer state and schedule continue from the MoT run.", "",
                  "![transition](results/transition.png)"]
    if results["zero_shot"]:
        lines += ["", "## Zero-shot", "",
                  f"First {budget['zero_shot_limit']} documents of each task (acc_norm where defined, else acc); "
                  "models this small score near chance (PIQA 0.5, HellaSwag 0.25, ARC-Easy about 0.25): the table "
                  "shows the pipeline works, not that one model is better.", "",
                  "| model | " + " | ".join(ZERO_SHOT_TASKS) + " | mean |", "|---|" + "---|" * (len(ZERO_SHOT_TASKS) + 1)]
        for name, scores in results["zero_shot"].items():
            values = [scores[task]["value"] for task in ZERO_SHOT_TASKS]
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {sum(values) / len(values):.3f} |")
    lines.append("")
    return "\n".join(lines)


def write(plan: Plan, records, out: Path, update_docs: bool, docs_dir: Path) -> dict:
    """Compute everything from the records and write results.json, the plots and results.md into `out` (and a copy
    of results.md and the plots into `docs_dir`)."""
    results = collect(plan, records)
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = [f"{PLOTS_FOLDER}/{name}" for name in write_plots(results, out / PLOTS_FOLDER)]
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (out / "results.md").write_text(render_markdown(results), encoding="utf-8")
    if update_docs:
        (docs_dir / PLOTS_FOLDER).mkdir(parents=True, exist_ok=True)
        for name in PLOT_FILES:
            shutil.copyfile(out / PLOTS_FOLDER / name, docs_dir / PLOTS_FOLDER / name)
        shutil.copyfile(out / "results.md", docs_dir / "results.md")
    return results


__all__ = ["write", "collect", "first_crossing", "ZERO_SHOT_TASKS", "PLOT_FILES"]
