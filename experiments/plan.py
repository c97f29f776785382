"""What the reproduction (`python -m experiments`) runs: the widths, the models, the seeds, the learning-rate sweep and the extra experiments.

Nothing here trains (runner.py does) or renders (report.py does). A plan is a list of `Run`s; each has a unique
`key` that names its record file, so a plan can be resumed run by run.

The default plan, in the order it runs (docs/reproduce.md says why each piece is there):

- **learning-rate sweep**: the dense model at four peak learning rates at width 128 and three at width 256, on a
  quarter of the schedule
  (seed 0); the lowest final eval loss picks the width's learning rate, used by every other run of that width;
- **main comparison** at widths 128 (seeds 0 and 1) and 256 (seed 0): dense, MoT, MoT with uniform routing and
  Token Choice (and Expert Choice at width 128, seed 0), routed layers in the upper half of the blocks as in the
  paper; the same data, tokenizer, schedule and FLOPs per token;
- **routed layers that carry weight**: MoT and its uniform ablation with MoT in *every* block, at every width
  (seed 0), so that MoT - uniform is measurable (with MoT in the upper half only, routing stays near uniform at this
  scale);
- **the authors' wrapper**: dense and MoT with their embedding initialisation and no final norm (width 128);
- **extras** at width 128 on a shorter schedule: bf16-only weights (only where the CPU has native bf16: emulated,
  it is ~40x slower), transition tuning to Token Choice, group size, temperature and many small experts (/16).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

SWEEP, MAIN, ROUTED_WEIGHT, AUTHORS, BF16, GROUP_SIZE, TEMPERATURE, MANY_EXPERTS = (
    "sweep", "main", "routed_weight", "authors", "bf16", "group_size", "temperature", "many_experts")
EXTRA_SECTIONS = (BF16, GROUP_SIZE, TEMPERATURE, MANY_EXPERTS)
SECTIONS = (SWEEP, MAIN, ROUTED_WEIGHT, AUTHORS, *EXTRA_SECTIONS)
TRANSITION_FRACTION = 0.10  # the paper: 150K MoT steps + 15K Token Choice steps


# ------------------------------------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class Width:
    """One model width of the comparison: its shape, the dense learning rates to sweep, and its seeds."""

    hidden_size: int
    num_heads: int
    d_ff: int
    learning_rates: tuple[float, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Budget:
    """The schedule and data every run shares, and the widths."""

    widths: tuple[Width, ...]
    num_layers: int
    block_size: int
    batch_size: int
    vocab_size: int
    steps: int  # main comparison, routed-weight and authors' runs
    sweep_steps: int  # the learning-rate sweep
    extra_steps: int  # the extras (bf16, group size, temperature, /16) and their MoT/Expert Choice references
    eval_every: int
    eval_blocks: int
    zero_shot_limit: int
    group_size: int = 8

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_step": self.tokens_per_step}

    def run_defining(self) -> dict:
        return run_defining(self.as_dict())

    def replace(self, **changes) -> Budget:
        return Budget(**{**{name: getattr(self, name) for name in self.__dataclass_fields__}, **changes})


def run_defining(budget: dict) -> dict:
    """What a recorded run depends on, from a budget's `as_dict()` (or its JSON): everything but the widths'
    learning-rate grids and seed lists, which only add or remove runs (each run's rate and seed are in its key). A
    plan may grow them and keep its records."""
    fields = {**budget, "widths": [{k: v for k, v in dict(width).items() if k not in ("learning_rates", "seeds")}
                                   for width in budget["widths"]]}
    return json.loads(json.dumps(fields))  # tuples as lists, as a record holds them


def make_budget(smoke: bool = False, steps: int | None = None, zero_shot_limit: int | None = None) -> Budget:
    """The default: 4-block models of width 128 and 256, 2,500 steps of 32 x 64 tokens (5.1M tokens) per run.
    `smoke`: the same plan at toy size, a few steps per run (the test)."""
    if smoke:
        budget = Budget(widths=(Width(32, 2, 64, (2e-3, 4e-3), (0, 1)), Width(48, 2, 96, (2e-3, 4e-3), (0,))),
                        num_layers=2, block_size=16, batch_size=32, vocab_size=512, steps=4, sweep_steps=3,
                        extra_steps=3, eval_every=2, eval_blocks=32, zero_shot_limit=2)
    else:
        # Each grid brackets its width's best rate from both sides (the chosen rate is interior: docs/results.md).
        budget = Budget(widths=(Width(128, 4, 256, (5e-4, 1e-3, 2e-3, 4e-3), (0, 1)),
                                Width(256, 8, 512, (3.75e-4, 7.5e-4, 1.5e-3), (0,))),
                        num_layers=4, block_size=64, batch_size=32, vocab_size=2048, steps=2_500, sweep_steps=625,
                        extra_steps=600, eval_every=125, eval_blocks=256, zero_shot_limit=100)
    if steps is not None:
        budget = budget.replace(steps=steps, sweep_steps=max(1, steps // 4), extra_steps=max(1, steps // 4),
                                eval_every=max(1, steps // 10))
    if zero_shot_limit is not None:
        budget = budget.replace(zero_shot_limit=zero_shot_limit)
    return budget


# ------------------------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class Model:
    """A model of the comparison at any width: its routed feed-forward type, where the routed layers go, and its
    `mot train` config overrides."""

    name: str
    description: str
    mlp: str  # feed-forward type of the routed blocks ("dense" = none)
    routed: str = "upper"  # "upper": the second half of the blocks (the paper); "all": every block
    experts_per_group: int = 1  # E = G * experts_per_group experts of f = d_ff / experts_per_group
    group_size: int | None = None  # None: the budget's
    overrides: dict = field(default_factory=dict)
    bf16_weights: bool = False

    def config_settings(self, budget: Budget, width: Width) -> dict:
        routed = budget.num_layers if self.routed == "all" else budget.num_layers // 2
        mlp_types = ["dense"] * (budget.num_layers - routed) + [self.mlp] * routed
        group_size = self.group_size or budget.group_size
        return {
            "hidden_size": width.hidden_size, "num_hidden_layers": budget.num_layers,
            "num_attention_heads": width.num_heads, "intermediate_size": width.d_ff,
            "max_position_embeddings": budget.block_size, "mlp_types": ",".join(mlp_types),
            "group_size": group_size, "num_experts": group_size * self.experts_per_group,
            "expert_size": width.d_ff // self.experts_per_group, **self.overrides,
        }


UNIFORM = {"mot_routing": "uniform"}
AUTHORS_WRAPPER = {"embedding_init": "unit_fan_in", "final_norm": False}
MODELS = {model.name: model for model in (
    Model("dense", "dense Transformer (baseline)", "dense"),
    Model("mot", "MoT, G = E = 8, f = d_ff (flop-matched), upper half", "mot"),
    Model("mot_uniform", "MoT with uniform routing (weights 1/G), upper half", "mot", overrides=UNIFORM),
    Model("token_choice", "Token Choice top-1, E = 8, f = d_ff, cf 1.25, upper half", "token_choice"),
    Model("expert_choice", "Expert Choice, G = E = 8, f = d_ff, upper half", "expert_choice"),
    Model("mot_all", "MoT in every block, G = E = 8, f = d_ff", "mot", routed="all"),
    Model("mot_all_uniform", "MoT in every block, uniform routing", "mot", routed="all", overrides=UNIFORM),
    Model("dense_authors", "dense, the authors' embedding init and no final norm", "dense",
          overrides=AUTHORS_WRAPPER),
    Model("mot_authors", "MoT, the authors' embedding init and no final norm", "mot", overrides=AUTHORS_WRAPPER),
    Model("mot_bf16", "MoT, bf16-only weights and optimizer state", "mot", bf16_weights=True),
    Model("expert_choice_bf16", "Expert Choice, bf16-only weights and optimizer state", "expert_choice",
          bf16_weights=True),
    Model("mot_g16", "MoT, G = E = 16, f = d_ff", "mot", group_size=16),
    Model("mot_g32", "MoT, G = E = 32, f = d_ff", "mot", group_size=32),
    Model("mot_t0.5", "MoT, fixed temperature 0.5", "mot", overrides={"mot_temperature": 0.5}),
    Model("mot_t2", "MoT, fixed temperature 2", "mot", overrides={"mot_temperature": 2.0}),
    Model("mot_t_learned", "MoT, learnable temperature (one per layer, starts at 1)", "mot",
          overrides={"learnable_temperature": "shared"}),
    Model("mot_x16", "MoT /16: E = 16 G experts of f = d_ff / 16", "mot", experts_per_group=16),
)}
MAIN_MODELS = ("dense", "mot", "mot_uniform", "token_choice", "expert_choice")  # Expert Choice: first width, seed
ROUTED_WEIGHT_MODELS = ("mot_all", "mot_all_uniform")
AUTHORS_MODELS = ("dense_authors", "mot_authors")
# Each extra section with its models; the MoT (and Expert Choice) references train on the same shorter schedule.
EXTRAS = {BF16: ("mot", "expert_choice", "mot_bf16", "expert_choice_bf16"),
          GROUP_SIZE: ("mot", "mot_g16", "mot_g32"),
          TEMPERATURE: ("mot_t0.5", "mot", "mot_t2", "mot_t_learned"),
          MANY_EXPERTS: ("mot", "mot_x16")}
BF16_PAIRS = {"mot": "mot_bf16", "expert_choice": "expert_choice_bf16"}


# ------------------------------------------------------------------------------------------------ runs
@dataclass(frozen=True)
class Run:
    """One training run. `learning_rate` None: the width's learning rate, chosen by the sweep."""

    model: str
    width: int  # hidden size, a key of the budget's widths
    seed: int
    steps: int
    section: str
    learning_rate: float | None = None
    save_checkpoint: bool = False  # the transition continues from its optimizer state

    @property
    def key(self) -> str:
        """The record's name: width, model, and what sets the run apart (sweep rate, shorter schedule), seed."""
        rate = "" if self.learning_rate is None else f"-lr{self.learning_rate:g}"
        length = f"-{self.steps}steps" if self.section in (SWEEP, *EXTRA_SECTIONS) else ""
        return f"w{self.width}-{self.model}{rate}{length}-s{self.seed}"


@dataclass(frozen=True)
class Transition:
    """`mot transition` of a MoT run to Token Choice for +10% of its steps."""

    source: Run

    @property
    def key(self) -> str:
        return f"{self.source.key}-transition"

    @property
    def steps(self) -> int:
        return max(1, round(TRANSITION_FRACTION * self.source.steps))


@dataclass(frozen=True)
class Plan:
    budget: Budget
    runs: tuple[Run, ...]
    transition: Transition
    zero_shot: tuple[Run, ...]  # models scored on PIQA, HellaSwag and ARC-Easy (and the transition's)

    def sweep(self, hidden_size: int) -> list[Run]:
        return [run for run in self.runs if run.section == SWEEP and run.width == hidden_size]

    def section(self, name: str) -> list[Run]:
        return [run for run in self.runs if run.section == name]


def make_plan(budget: Budget, sections: tuple[str, ...] = SECTIONS) -> Plan:
    """Every run of the reproduction in the order they start: each width's sweep first (the rest of the width waits
    for its learning rate), the main comparison of the first width with all its seeds, then the other widths, then
    the rest. `sections` leaves parts out (the sweep and the main comparison always run)."""
    first, seed = budget.widths[0], budget.widths[0].seeds[0]
    runs: list[Run] = []
    for width in budget.widths:
        runs += [Run("dense", width.hidden_size, seed, budget.sweep_steps, SWEEP, learning_rate=rate)
                 for rate in width.learning_rates]
        for each in width.seeds:
            models = MAIN_MODELS if (width, each) == (first, seed) else MAIN_MODELS[:-1]
            runs += [Run(name, width.hidden_size, each, budget.steps, MAIN,
                         save_checkpoint=(name, width, each) == ("mot", first, seed)) for name in models]
    if ROUTED_WEIGHT in sections:
        runs += [Run(name, width.hidden_size, seed, budget.steps, ROUTED_WEIGHT)
                 for width in budget.widths for name in ROUTED_WEIGHT_MODELS]
    if AUTHORS in sections:
        runs += [Run(name, first.hidden_size, seed, budget.steps, AUTHORS) for name in AUTHORS_MODELS]
    extras: dict[str, Run] = {}
    for section in EXTRA_SECTIONS:
        if section in sections:
            for name in EXTRAS[section]:
                extras.setdefault(name, Run(name, first.hidden_size, seed, budget.extra_steps, section))
    runs += extras.values()
    transition_source = next(run for run in runs if run.save_checkpoint)
    zero_shot = [run for run in runs if run.section == MAIN and run.seed == seed]
    return Plan(budget, tuple(runs), Transition(transition_source), tuple(zero_shot))


def run_settings(run: Run, budget: Budget, learning_rate: float) -> dict:
    """`mot train` settings (`training_arguments`) of a run's model, seed and learning rate; data, schedule and output
    are the runner's."""
    model = MODELS[run.model]
    width = next(width for width in budget.widths if width.hidden_size == run.width)
    return {"preset": "tiny-mot", "learning_rate": learning_rate, "seed": run.seed, "data_seed": run.seed,
            "max_steps": run.steps, **model.config_settings(budget, width), "bf16_weights": model.bf16_weights}


__all__ = ["Budget", "Width", "Model", "Run", "Transition", "Plan", "MODELS", "make_budget", "make_plan",
           "run_settings", "SECTIONS"]
