"""How long the default reproduction (`python -m experiments`) would take on this machine, measured before
committing hours to it.

The reproduction's wall time depends on the CPU (a 2-core AVX2 EPYC runs width 128 2-2.5x slower than the
AVX-512 Xeon the committed records come from). This script trains a few of the plan's own runs for `--steps` steps
exactly as the reproduction does (same code path and data shapes; `--workers 2`: two one-thread runs side by side,
the reproduction's default; `--workers 1`: one two-thread run after the other), takes their training time per
step after the first `--skip` steps, and divides it by the same runs' time per step in the committed records, each
per run of wall time (a side-by-side step counts half). The mean ratio times the records' total wall time is the
estimate for this machine; running it with both `--workers` values says which `python -m experiments --workers`
is faster here. Prints a table and writes JSON.

    python bench/reproduce_time.py                     # 2 pairs per width, 200 steps each: about 6 min on 2 cores
    python bench/reproduce_time.py --workers 1         # the same runs one after the other, two threads each
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments.plan import MAIN, ROUTED_WEIGHT, Run, make_budget  # noqa: E402
from experiments.runner import (  # noqa: E402
    DOCS_RECORDS,
    RunRecords,
    _worker_init,
    cpu_model,
    default_data_dir,
    execute,
    prepare_data,
    train_shared_tokenizer,
)
from mixture_of_tokens.utils import UserError  # noqa: E402

# Side by side as the plan runs them: (model, section) pairs per width.
PAIRS = ((("dense", MAIN), ("mot", MAIN)), (("mot_all", ROUTED_WEIGHT), ("token_choice", MAIN)))


def seconds_per_step(curve: list[dict], skip: int) -> float:
    """Training seconds per step between the first evaluation at or after `skip` steps and the last one."""
    start = next(point for point in curve if point["step"] >= skip)
    end = curve[-1]
    return (end["train_seconds"] - start["train_seconds"]) / (end["step"] - start["step"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per timed run (default 200)")
    parser.add_argument("--skip", type=int, default=40, help="first steps not timed (default 40)")
    parser.add_argument("--workers", type=int, choices=(1, 2), default=2,
                        help="2: runs side by side, one thread each (default); 1: one after the other, two threads")
    parser.add_argument("--records_dir", type=Path, default=DOCS_RECORDS, help="the records to compare with")
    parser.add_argument("--data_dir", type=Path, default=None, help="shared data folder (default ../shared/data)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "reproduce_time.json")
    args = parser.parse_args(argv)
    if not 0 < args.skip < args.steps:
        parser.error(f"--skip {args.skip} must be between 0 and --steps {args.steps}")
    records = RunRecords(args.records_dir)
    manifest = records.manifest()
    if manifest is None:
        parser.error(f"--records_dir {args.records_dir} holds no plan.json: nothing to compare with")
    reference_minutes = sum(session["seconds"] for session in manifest["sessions"]) / 60
    reference_cpu = manifest["sessions"][-1]["environment"]["cpu"]

    # The plan's shapes, but only as much text as these short runs read, and evaluations every `skip` steps on a
    # few blocks (the clock does not count evaluation time).
    budget = make_budget(steps=args.steps).replace(eval_every=args.skip, eval_blocks=32)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        try:
            train_file, valid_file = prepare_data(args.data_dir or default_data_dir(), folder / "data", budget)
        except UserError as error:
            parser.error(str(error))
        train_shared_tokenizer(train_file, folder / "tokenizer", budget.vocab_size)
        data = {"train_file": str(train_file), "valid_file": str(valid_file), "tokenizer": str(folder / "tokenizer")}
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(2 // args.workers,)) as pool:
            for width in (w.hidden_size for w in budget.widths):
                for pair in PAIRS:
                    runs = [Run(model, width, 0, args.steps, section) for model, section in pair]
                    jobs = [{"kind": "train", "key": run.key, "budget": budget, "run": run,
                             "learning_rate": 1e-3, "data": data, "output": str(folder / "runs" / run.key),
                             "log": str(folder / "logs" / f"{run.key}.log")} for run in runs]
                    started = time.perf_counter()
                    measured = [future.result() for future in [pool.submit(execute, job) for job in jobs]]
                    for run, record in zip(runs, measured, strict=True):
                        # Wall time per step of the whole plan: runs side by side share it.
                        here = seconds_per_step(record["curve"], args.skip) / args.workers
                        reference = records.get(run.key) if records.has(run.key) else None
                        there = (None if reference is None
                                 else reference["train_seconds"] / reference["steps"] / reference["workers"])
                        rows.append({"run": run.key, "seconds_per_step": round(here, 4),
                                     "reference_seconds_per_step": None if there is None else round(there, 4),
                                     "ratio": None if there is None else round(here / there, 3)})
                    print(f"  width {width}: {' + '.join(m for m, _ in pair)}, {args.workers} at a time, "
                          f"{time.perf_counter() - started:.0f} s", flush=True)
    ratios = [row["ratio"] for row in rows if row["ratio"] is not None]
    ratio = statistics.fmean(ratios) if ratios else None
    result = {"cpu": cpu_model(), "workers": args.workers, "steps": args.steps, "skip": args.skip, "rows": rows,
              "reference_cpu": reference_cpu, "reference_minutes": round(reference_minutes, 1),
              "mean_ratio": None if ratio is None else round(ratio, 3),
              "estimated_minutes": None if ratio is None else round(reference_minutes * ratio, 1)}
    print(f"\nWall seconds per step of the plan (a run's s/step divided by the runs side by side), {args.workers} "
          "at a time here")
    print(f"\n| run | here ({result['cpu']}) | in the records ({reference_cpu}) | ratio |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['run']} | {row['seconds_per_step']:.4f} | {row['reference_seconds_per_step']} | {row['ratio']} |")
    if ratio is not None:
        print(f"\nmean ratio {ratio:.2f}: the default `python -m experiments --workers {args.workers}` "
              f"({reference_minutes:.0f} min in the records) would take about {result['estimated_minutes']:.0f} min here")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
