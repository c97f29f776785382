"""`python -m experiments`: run the reproduction plan (plan.py) and write its report (report.py).

Every run goes through the library's Python API (`training_arguments` and `run_training`, `transition_tune`,
`evaluate`: what `mot train`, `mot transition` and `mot eval` run) on the same novels (ELTeC-eng from
`../shared/data`), one tokenizer trained once, and the same schedule. Runs go one after the other with every core,
or side by side in worker processes (`--workers N`). Each finished run leaves a small JSON record (`--records_dir`);
`--resume` keeps them and trains only what is missing, so the reproduction can take more than one sitting. The
default records folder is `docs/results/run_records`, committed with the report.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

from mixture_of_tokens.folders.model_folder import CONFIG_FILE
from mixture_of_tokens.utils import UserError, atomic_write_text

from . import report
from .plan import (
    BF16,
    MODELS,
    SECTIONS,
    Budget,
    Plan,
    Run,
    Transition,
    make_budget,
    make_plan,
    run_defining,
    run_settings,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT_DIR = REPO_ROOT / "runs" / "reproduce"
DOCS_DIR = REPO_ROOT / "docs"
DOCS_RECORDS = DOCS_DIR / "results" / "run_records"
CORPUS = Path("eltec_eng") / "eltec_eng_level1_body.txt.gz"
CHARS_PER_TOKEN = 3.5  # a small byte-level BPE on English prose gives ~4; the margin keeps the text long enough


def default_data_dir() -> Path:
    return Path(os.environ.get("MOT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def progress(message: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ data
def prepare_data(data_dir: Path, folder: Path, budget: Budget) -> tuple[Path, Path]:
    """Write the training text (the first novels, whole, enough for the longest run without repeating) and the
    validation text (the start of the last novels, never trained on) in `mot train`'s .txt format."""
    corpus = data_dir / CORPUS
    if not corpus.is_file():
        raise UserError(f"the novels corpus {corpus} does not exist; pass --data_dir pointing at shared/data (the "
                        f"folder holding {CORPUS})")
    from mixture_of_tokens.data import split_novels

    training_novels, held_out = split_novels(corpus)
    train_chars = int(budget.steps * budget.tokens_per_step * CHARS_PER_TOKEN * 1.1) + 200_000
    valid_chars = int(budget.eval_blocks * budget.block_size * CHARS_PER_TOKEN * 1.5) + 20_000
    training, total = [], 0
    for novel in training_novels:
        take = novel[:train_chars - total]
        training.append(take[:take.rfind("\n")] if len(take) < len(novel) and "\n" in take else take)
        total += len(training[-1])
        if total >= train_chars:
            break
    validation = "\n\n".join(held_out)[:valid_chars]
    validation = validation[:validation.rfind("\n")]
    folder.mkdir(parents=True, exist_ok=True)
    train_file, valid_file = folder / "train.txt", folder / "valid.txt"
    atomic_write_text(train_file, "\n\n".join(training) + "\n")
    atomic_write_text(valid_file, validation + "\n")
    return train_file, valid_file


def train_shared_tokenizer(train_file: Path, folder: Path, vocab_size: int) -> str:
    """Train the one tokenizer every run uses; returns a fingerprint of it (resumed runs must share it)."""
    from mixture_of_tokens.training.tokenization import train_bpe_tokenizer

    with open(train_file, encoding="utf-8") as handle:
        tokenizer = train_bpe_tokenizer((line for line in handle if line.strip()), vocab_size=vocab_size)
    tokenizer.save_pretrained(folder)
    return tokenizer_fingerprint(folder)


def tokenizer_fingerprint(folder: Path) -> str:
    vocabulary = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    return hashlib.sha256(json.dumps([vocabulary["vocab"], vocabulary["merges"]], sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ one run
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


def routing_series(log_history: list[dict], group_size: int) -> list[dict]:
    """Each MoT layer's mixing-weight entropy (also over log G: 1 = uniform weights) and mean weight on the
    top token of the group, at every logged step."""
    series = []
    for entry in log_history:
        layers = {}
        for key, value in entry.items():
            if key.startswith("routing/layer_") and key.endswith(("/mixing_entropy", "/max_weight")):
                layer, statistic = key[len("routing/layer_"):].split("/")
                layers.setdefault(layer, {})[statistic] = round(float(value), 5)
        layers = {layer: {**stats, "normalized_entropy": round(stats["mixing_entropy"] / math.log(group_size), 5)}
                  for layer, stats in layers.items() if "mixing_entropy" in stats and group_size > 1}
        if layers and "step" in entry:
            series.append({"step": entry["step"], "layers": dict(sorted(layers.items(), key=lambda kv: int(kv[0])))})
    return series


def common_train_settings(budget: Budget, data: dict) -> dict:
    return {
        "dataset": data["train_file"], "validation_file": data["valid_file"], "tokenizer": data["tokenizer"],
        "block_size": budget.block_size, "per_device_train_batch_size": budget.batch_size,
        "per_device_eval_batch_size": budget.batch_size, "max_eval_blocks": budget.eval_blocks, "report_to": "none",
        "disable_tqdm": True, "dataloader_num_workers": 0, "overwrite_output_dir": True,
    }


def train_run(run: Run, learning_rate: float, budget: Budget, data: dict, output: Path) -> dict:
    from mixture_of_tokens.training.train import run_training, training_arguments

    every = min(budget.eval_every, max(1, run.steps // 4))
    saving = ({"save_strategy": "steps", "save_steps": run.steps, "save_total_limit": 1} if run.save_checkpoint
              else {"save_strategy": "no"})
    model_args, data_args, training_args = training_arguments(
        output_dir=str(output), **common_train_settings(budget, data), **run_settings(run, budget, learning_rate),
        eval_steps=every, logging_steps=every, **saving)
    clock = make_train_clock()
    outcome = run_training(model_args, data_args, training_args, callbacks=[clock])
    config = outcome.trainer.model.config
    return {
        "key": run.key, "model": run.model, "description": MODELS[run.model].description, "section": run.section,
        "width": run.width, "seed": run.seed, "learning_rate": learning_rate, "steps": run.steps,
        "model_dir": str(output), "mlp_types": list(config.mlp_types), "group_size": config.group_size,
        "num_experts": config.num_experts, "expert_size": config.expert_size,
        "bf16_weights": MODELS[run.model].bf16_weights, "num_parameters": outcome.metrics["num_parameters"],
        "final_eval_loss": outcome.eval_loss, "train_seconds": round(clock.seconds, 2), "curve": clock.points,
        "routing": routing_series(outcome.trainer.state.log_history, config.group_size),
    }


def transition_run(job: Transition, source_dir: Path, output: Path) -> dict:
    from mixture_of_tokens.conversion.convert import transition_tune

    every = max(1, job.steps // 5)
    outcome, checkpoint = transition_tune(
        source_dir, output, steps=job.steps, overwrite=True, eval_on_start=True, eval_steps=every,
        logging_steps=every, save_strategy="no", report_to="none", disable_tqdm=True, seed=0, data_seed=0,
        dataloader_num_workers=0)
    curve = [{"step": entry["step"], "eval_loss": float(entry["eval_loss"])}
             for entry in outcome.trainer.state.log_history if "eval_loss" in entry]
    unique = {point["step"]: point for point in reversed(curve)}  # the final evaluate() repeats the last step
    return {"key": job.key, "source": job.source.key, "model_dir": str(output), "steps": job.steps,
            "description": "MoT run converted to Token Choice (same tensors), trained +10% steps",
            "optimizer_continued": checkpoint is not None, "final_eval_loss": outcome.eval_loss,
            "curve": sorted(unique.values(), key=lambda p: p["step"])}


def zero_shot(key: str, model_dir: Path, data_dir: Path, limit: int, output: Path) -> dict:
    from mixture_of_tokens.evaluation.evaluation import evaluate

    results = evaluate(model_dir, tasks=report.ZERO_SHOT_TASKS, data_dir=data_dir, limit=limit, output=output,
                       device="cuda" if _cuda() else "cpu")
    scores = {"key": key}
    for task in report.ZERO_SHOT_TASKS:
        metrics = results["results"][task]
        metric = "acc_norm,none" if "acc_norm,none" in metrics else "acc,none"
        scores[task] = {"metric": metric.split(",")[0], "value": round(float(metrics[metric]), 4)}
    meta = results.get("mot_eval", {})
    scores["scoring"] = {k: meta.get(k) for k in ("batch_size", "group_size", "mot_routing", "batch_dependent")}
    return scores


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def execute(job: dict) -> dict:
    """Run one job (a plain dict, so that it crosses to a worker process) and return its record. In a worker, the
    job's log goes to `job["log"]` instead of the terminal."""
    log = job.get("log")
    with contextlib.ExitStack() as stack:
        if log:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            handle = stack.enter_context(open(log, "w", encoding="utf-8"))
            stack.enter_context(contextlib.redirect_stdout(handle))
            stack.enter_context(contextlib.redirect_stderr(handle))
        budget = job["budget"]
        if job["kind"] == "train":
            return train_run(job["run"], job["learning_rate"], budget, job["data"], Path(job["output"]))
        if job["kind"] == "transition":
            return transition_run(job["transition"], Path(job["source_dir"]), Path(job["output"]))
        return zero_shot(job["key"], Path(job["model_dir"]), Path(job["data_dir"]), budget.zero_shot_limit,
                         Path(job["output"]))


def _worker_init(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ records
class RunRecords:
    """Each finished job's result as one small JSON file, so that `--resume` finishes an interrupted reproduction
    (in a later sitting, or another clone: the default folder is committed)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def manifest(self) -> dict | None:
        path = self.folder / "plan.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def start(self, manifest: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / "plan.json", json.dumps(manifest, indent=2) + "\n")

    def clear(self) -> None:
        if self.folder.is_dir():
            for path in self.folder.glob("*.json"):
                path.unlink()

    def keys(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.json") if p.stem != "plan")

    def has(self, key: str) -> bool:
        return (self.folder / f"{key}.json").is_file()

    def get(self, key: str) -> dict:
        return json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8"))

    def put(self, key: str, record: dict) -> dict:
        atomic_write_text(self.folder / f"{key}.json", json.dumps(record, indent=1) + "\n")
        return record

    def drop(self, key: str) -> None:
        (self.folder / f"{key}.json").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ the plan
class Reproduction:
    """Runs a plan's jobs as their inputs become ready, `workers` at a time, recording each one as it finishes."""

    def __init__(self, plan: Plan, records: RunRecords, out: Path, data: dict, data_dir: Path, workers: int,
                 threads: int):
        self.plan, self.records, self.out, self.data, self.data_dir = plan, records, out, data, data_dir
        self.workers, self.threads = workers, threads
        self.started = time.perf_counter()

    # -- what each job needs -------------------------------------------------------------------------------
    def learning_rate(self, width: int) -> float | None:
        """The width's learning rate: the sweep's best dense run (None until every sweep run is recorded)."""
        sweep = self.plan.sweep(width)
        if not all(self.records.has(run.key) for run in sweep):
            return None
        return min(sweep, key=lambda run: self.records.get(run.key)["final_eval_loss"]).learning_rate

    def model_dir(self, run: Run) -> Path:
        return self.out / "runs" / run.key

    def jobs(self) -> list[tuple]:
        """Every job of the plan as (kind, item): ("train", Run), ("transition", Transition), ("zero_shot", Run or
        Transition: the model it scores)."""
        # A zero-shot job right after its model's training: it then runs in the same sitting, while the model folder
        # exists (a later sitting in a fresh clone would have to train the model again).
        items = []
        for run in self.plan.runs:
            items.append(("train", run))
            if run in self.plan.zero_shot:
                items.append(("zero_shot", run))
        return items + [("transition", self.plan.transition), ("zero_shot", self.plan.transition)]

    def job_key(self, kind: str, item) -> str:
        if kind == "zero_shot":
            return f"{item.key}-zero_shot"
        return item.key

    def ready(self, kind: str, item) -> bool:
        if kind == "train":
            return item.learning_rate is not None or self.learning_rate(item.width) is not None
        source = item.source if kind == "transition" else item
        return self.records.has(source.key) and (self.model_dir(source) / CONFIG_FILE).is_file()

    def make_job(self, kind: str, item, in_worker: bool) -> dict:
        key = self.job_key(kind, item)
        job = {"kind": kind, "key": key, "budget": self.plan.budget,
               "log": str(self.out / "logs" / f"{key}.log") if in_worker else None}
        if kind == "train":
            rate = item.learning_rate or self.learning_rate(item.width)
            job.update(run=item, learning_rate=rate, data=self.data, output=str(self.out / "runs" / item.key))
        elif kind == "transition":
            job.update(transition=item, source_dir=str(self.model_dir(item.source)),
                       output=str(self.out / "runs" / item.key))
        else:
            job.update(model_dir=str(self.model_dir(item)), data_dir=str(self.data_dir),
                       output=str(self.out / "zero_shot" / f"{key}.json"))
        return job

    def redo_missing_models(self) -> None:
        """A resumed reproduction in a fresh clone has the records but not the model folders. Where a job still
        to run needs a model folder that is gone (the transition's checkpoint, a zero-shot model), that model's
        record is dropped so the model is trained again (repeated: a transition to redo needs its MoT run)."""
        dropped = True
        while dropped:
            dropped = False
            for kind, item in self.jobs():
                if kind == "train" or self.records.has(self.job_key(kind, item)):
                    continue
                source = item.source if kind == "transition" else item
                if self.records.has(source.key) and not (self.model_dir(source) / CONFIG_FILE).is_file():
                    progress(f"{source.key}: recorded, but its model folder is gone and {self.job_key(kind, item)} "
                             "needs it; training it again")
                    self.records.drop(source.key)
                    dropped = True

    # -- running -------------------------------------------------------------------------------------------
    def run(self) -> None:
        self.redo_missing_models()
        todo = [(kind, item) for kind, item in self.jobs() if not self.records.has(self.job_key(kind, item))]
        total = len(todo)
        if not todo:
            progress("every run is recorded; nothing to train")
            return
        progress(f"{total} jobs to run, {self.workers} at a time ({self.threads} thread(s) each)")
        done = 0
        if self.workers == 1:
            import torch

            torch.set_num_threads(self.threads)
            while todo:
                ready = [(k, i) for k, i in todo if self.ready(k, i)]
                if not ready:
                    raise RuntimeError(f"no job can start: {[self.job_key(*ki) for ki in todo]}")
                kind, item = ready[0]
                todo.remove((kind, item))
                self._start_message(kind, item, done, total)
                self._finish(kind, item, execute(self.make_job(kind, item, in_worker=False)), done := done + 1, total)
            return
        context = get_context("spawn")
        with ProcessPoolExecutor(self.workers, mp_context=context, initializer=_worker_init,
                                 initargs=(self.threads,)) as pool:
            running = {}
            while todo or running:
                for kind, item in [ki for ki in todo if self.ready(*ki)][:self.workers - len(running)]:
                    todo.remove((kind, item))
                    self._start_message(kind, item, done, total)
                    running[pool.submit(execute, self.make_job(kind, item, in_worker=True))] = (kind, item)
                if not running:
                    raise RuntimeError(f"no job can start: {[self.job_key(*ki) for ki in todo]} wait for records "
                                       "that will never come")
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    kind, item = running.pop(future)
                    try:
                        record = future.result()
                    except Exception:
                        progress(f"{self.job_key(kind, item)} failed; its log: "
                                 f"{self.out / 'logs' / (self.job_key(kind, item) + '.log')}")
                        raise
                    done += 1
                    self._finish(kind, item, record, done, total)

    def _start_message(self, kind: str, item, done: int, total: int) -> None:
        what = {"train": lambda: f"{getattr(item, 'steps', '')} steps", "transition": lambda: f"+{item.steps} steps",
                "zero_shot": lambda: "PIQA, HellaSwag, ARC-Easy"}[kind]()
        progress(f"[{done + 1}/{total}] start {self.job_key(kind, item)} ({what})")

    def _finish(self, kind: str, item, record: dict, done: int, total: int) -> None:
        key = self.job_key(kind, item)
        record = {**record, "workers": self.workers, "threads": self.threads}
        self.records.put(key, record)
        elapsed = time.perf_counter() - self.started
        manifest = self.records.manifest()
        manifest["sessions"][-1]["seconds"] = round(elapsed, 1)
        self.records.start(manifest)
        loss = f"final eval loss {record['final_eval_loss']:.4f}, " if "final_eval_loss" in record else ""
        progress(f"[{done}/{total}] done {key}: {loss}{elapsed / 60:.1f} min elapsed")


# ------------------------------------------------------------------------------------------------ command
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description="Small-scale reproduction of the Mixture of Tokens paper's claims: dense, MoT, its uniform "
                    "ablation, Token Choice and Expert Choice at two widths with seeds and a learning-rate sweep, "
                    "then the bf16, transition, group-size, temperature and /16 experiments and zero-shot evals; "
                    "writes results.json, plots and results.md.")
    parser.add_argument("--output_dir", type=Path, default=None,
                        help=f"where model folders, logs, results.json, results.md and plots go (default "
                             f"{DEFAULT_OUTPUT_DIR}; with the default, results.md, its plots and the run records are "
                             "also written to docs/)")
    parser.add_argument("--records_dir", type=Path, default=None,
                        help="where each finished run's record goes (default docs/results/run_records with the "
                             "default --output_dir, else OUTPUT_DIR/run_records)")
    parser.add_argument("--smoke", action="store_true",
                        help="the same plan at toy size, a few steps per run: checks the pipeline (~70 s on 2 idle "
                             "CPU cores)")
    parser.add_argument("--data_dir", type=Path, default=None,
                        help="shared data folder holding eltec_eng/ and the zero-shot tasks (default ../shared/data "
                             "or $MOT_SHARED_DATA)")
    parser.add_argument("--steps", type=int, default=None,
                        help="override the steps of the main runs (the sweep and the extras take a quarter of them)")
    parser.add_argument("--zero_shot_limit", type=int, default=None,
                        help="documents per zero-shot task (default 100; smoke 2)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated parts of the plan to run; the sweep and the main comparison always "
                             f"run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--workers", type=int, default=2,
                        help="runs trained side by side in worker processes (default 2: on a 2-core Xeon two "
                             "one-thread runs side by side finished 7-14%% sooner than one two-thread run after the "
                             "other; on a 2-core EPYC they tied)")
    parser.add_argument("--threads_per_worker", type=int, default=None,
                        help="torch threads per run (default: the CPU cores divided by --workers)")
    docs = parser.add_mutually_exclusive_group()
    docs.add_argument("--update_docs", dest="update_docs", action="store_true", default=None,
                      help="copy results.md and its plots to docs/ (default: only with the default --output_dir)")
    docs.add_argument("--no_update_docs", dest="update_docs", action="store_false")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir and its records")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs recorded in the records folder (same budget) and do only the rest")
    parser.add_argument("--report_only", action="store_true",
                        help="train nothing: redraw the plots and results.md from the recorded runs")
    return parser


def check_arguments(args) -> tuple[str, ...]:
    sections = tuple(name.strip() for name in args.sections.split(",") if name.strip())
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        raise UserError(f"--sections: unknown part {unknown[0]!r}; allowed: {', '.join(SECTIONS)}")
    for name in ("steps", "zero_shot_limit", "workers", "threads_per_worker"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be a positive integer, got {value}")
    if args.report_only:
        if not (args.records_dir / "plan.json").is_file():
            raise UserError(f"--report_only: no run records in {args.records_dir}; run the reproduction first")
        return sections
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise UserError(f"--output_dir {args.output_dir} exists and is a file")
    if args.output_dir.is_dir() and any(args.output_dir.iterdir()) and not (args.overwrite or args.resume):
        raise UserError(f"--output_dir {args.output_dir} is not empty; pass --overwrite to replace its results or "
                        "--resume to finish an interrupted reproduction")
    if (args.records_dir / "plan.json").is_file() and not (args.overwrite or args.resume):
        raise UserError(f"{args.records_dir} holds the records of an earlier reproduction; pass --resume to finish it "
                        "(recorded runs are kept) or --overwrite to start again")
    if not (args.data_dir / CORPUS).is_file():
        raise UserError(f"no novels corpus at {args.data_dir / CORPUS}; pass --data_dir pointing at shared/data")
    from mixture_of_tokens.evaluation import eval_data

    eval_data.check_data_dir(args.data_dir, list(report.ZERO_SHOT_TASKS))
    return sections


def native_bf16() -> bool:
    """Whether bf16 matmuls run natively here. Without AVX512-BF16/AMX the CPU emulates them (~40x slower than
    fp32 measured on an AVX2 EPYC), which would make the bf16-only runs the longest of the reproduction."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def environment(device: str) -> dict:
    import torch
    import transformers

    return {"machine": platform.processor() or platform.machine(), "cpu": cpu_model(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "native_bf16": native_bf16(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": device, "python": platform.python_version()}


def cpu_model() -> str:
    """The CPU's model name (Linux), so that a sitting's timings say which machine made them."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    default_output = args.output_dir is None
    args.output_dir = (args.output_dir or DEFAULT_OUTPUT_DIR).resolve()
    committed = default_output and not args.smoke and args.steps is None and args.zero_shot_limit is None
    args.records_dir = (args.records_dir or (DOCS_RECORDS if committed else args.output_dir / "run_records")).resolve()
    args.data_dir = (args.data_dir or default_data_dir()).resolve()
    sections = check_arguments(args)
    update_docs = args.update_docs if args.update_docs is not None else committed
    records = RunRecords(args.records_dir)
    budget = make_budget(args.smoke, args.steps, args.zero_shot_limit)
    plan = make_plan(budget, sections)
    if args.report_only:
        # Parts an earlier sitting left out (and said so) are not waited for.
        skipped = {name for session in (records.manifest() or {}).get("sessions", [])
                   for name in session.get("skipped", {})}
        plan = make_plan(budget, tuple(name for name in sections if name not in skipped))
        report.write(plan, records, args.output_dir, update_docs, DOCS_DIR)
        return 0

    load_start = _load_average()
    out = args.output_dir
    manifest = json.loads(json.dumps({"budget": budget.as_dict(), "smoke": args.smoke}))  # as the records hold it
    previous = records.manifest()
    if args.resume and previous is not None and run_defining(previous["budget"]) != budget.run_defining():
        raise UserError(f"--resume: the records in {records.folder} were made with another budget (steps, widths or "
                        "data); pass --overwrite to start again, or another --output_dir/--records_dir")
    if not args.resume:
        if out.exists():
            shutil.rmtree(out)
        records.clear()
    elif previous is not None:
        progress(f"resuming: {len(records.keys())} recorded jobs kept from {records.folder}")
    progress(f"budget: {budget.steps} steps of {budget.batch_size} x {budget.block_size} tokens per main run; widths "
             f"{', '.join(str(w.hidden_size) for w in budget.widths)}")
    data_folder, tokenizer_dir = out / "data", out / "tokenizer"
    train_file, valid_file = prepare_data(args.data_dir, data_folder, budget)
    fingerprint = (tokenizer_fingerprint(tokenizer_dir) if (tokenizer_dir / "tokenizer.json").is_file()
                   else train_shared_tokenizer(train_file, tokenizer_dir, budget.vocab_size))
    if previous is not None and args.resume and previous.get("tokenizer") not in (None, fingerprint):
        raise UserError(f"--resume: the tokenizer trained now differs from the one the records in {records.folder} "
                        "were made with; pass --overwrite to start again")
    data = {"train_file": str(train_file), "valid_file": str(valid_file), "tokenizer": str(tokenizer_dir),
            "train_chars": train_file.stat().st_size}
    progress(f"data and a {budget.vocab_size}-token tokenizer ready in {out}")
    workers = args.workers
    threads = args.threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
    device = "cuda" if _cuda() else "cpu"
    skipped = {}
    if BF16 in sections and not args.smoke and not native_bf16():  # the smoke run's toy models take seconds anyway
        skipped[BF16] = ("this CPU has no native bf16 (no AVX512-BF16/AMX): emulated bf16 matmuls are ~40x slower "
                         "than fp32 here")
        sections = tuple(name for name in sections if name != BF16)
        plan = make_plan(budget, sections)
        progress(f"leaving out the bf16 experiment: {skipped[BF16]}")
    # Each sitting's wall time is kept in the manifest (updated as jobs finish), so the total over sittings is known.
    sessions = (previous or {}).get("sessions", []) if args.resume else []
    sessions.append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": 0.0, "workers": workers,
                     "threads": threads, "sections": list(sections), "skipped": skipped,
                     "environment": environment(device),
                     "load_average_start": load_start})
    records.start({**manifest, "tokenizer": fingerprint, "data": data, "sessions": sessions})
    Reproduction(plan, records, out, data, args.data_dir, workers, threads).run()
    manifest = records.manifest()
    manifest["sessions"][-1]["load_average_end"] = _load_average()
    records.start(manifest)
    report.write(plan, records, out, update_docs, DOCS_DIR)
    total = sum(session["seconds"] for session in manifest["sessions"])
    progress(f"finished: {manifest['sessions'][-1]['seconds'] / 60:.1f} min in this sitting, {total / 60:.1f} min over "
             f"{len(manifest['sessions'])} sitting(s)")
    return 0


__all__ = ["main", "prepare_data", "RunRecords", "Reproduction"]
