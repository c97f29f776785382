"""What a model folder records about how it was made, read for the model card and the exports: the training
arguments (`training_args.json`), the trainer state, the evaluation results (`eval_results.json`) and the conversion
lineage (`conversion.json`).

`training_args.bin` is a pickle and is never read: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils import UserError
from .model_folder import CONVERSION_FILE, EVAL_RESULTS_FILE, TRAINER_STATE_FILE, TRAINING_ARGS_FILE

# The sections `mot train` nests its arguments under in training_args.json (later sections win on a name clash).
ARGUMENT_SECTIONS = ("model_args", "data_args", "training_args")


def read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); fix or delete it and run `mot card` again") from error


def read_training_arguments(model_dir: Path) -> tuple[dict[str, Any], bool] | None:
    """`training_args.json` as one `{name: value}` dict, and whether it is `mot train`'s full record.

    `mot train` nests its arguments under `model_args` / `data_args` / `training_args` and records every one of
    them (None meaning "the default"); a hand-written file may hold the names at the top level.
    """
    args = read_json(model_dir / TRAINING_ARGS_FILE)
    if not isinstance(args, dict):
        return None
    sections = [args[name] for name in ARGUMENT_SECTIONS if isinstance(args.get(name), dict)]
    if not sections:
        return args, False
    flat: dict[str, Any] = {}
    for section in sections:
        flat.update(section)
    return flat, True


def read_trainer_state(model_dir: Path) -> Any:
    """The folder's trainer_state.json, else that of its last `checkpoint-N` (where `mot train` leaves it;
    Trainer saves a checkpoint at the final step, so the last one describes the whole run)."""
    state = read_json(model_dir / TRAINER_STATE_FILE)
    if state is not None:
        return state
    checkpoints = [p for p in model_dir.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()
                   and (p / TRAINER_STATE_FILE).is_file()]
    if not checkpoints:
        return None
    last = max(checkpoints, key=lambda p: int(p.name.split("-", 1)[1]))
    return read_json(last / TRAINER_STATE_FILE)


@dataclass
class EvalRow:
    task: str
    metric: str
    value: float


def read_eval_results(model_dir: Path) -> tuple[list[EvalRow], list[tuple[str, Any]]]:
    """lm-eval style `{"results": {task: {"acc,none": x, ...}}, "metadata": {...}}` -> rows and settings (the
    metadata's and config's short values).

    Keys are `metric,filter` (lm-eval >= 0.4) or plain `metric`; standard errors, aliases and non-numbers are skipped.
    """
    data = read_json(model_dir / EVAL_RESULTS_FILE)
    if not isinstance(data, dict):
        return [], []
    results = data.get("results", data)
    rows = []
    for task, metrics in (results.items() if isinstance(results, dict) else []):
        if not isinstance(metrics, dict):
            continue
        for key, value in metrics.items():
            metric = str(key).split(",")[0]
            if "stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                rows.append(EvalRow(str(task), metric, float(value)))
    settings = []
    for section in ("metadata", "config"):
        block = data.get(section)
        if isinstance(block, dict):
            settings += [(str(k), v) for k, v in block.items()
                         if isinstance(v, (str, int, float, bool)) or (isinstance(v, list) and len(v) <= 8)]
    return rows, settings


def read_conversion(model_dir: Path, config) -> tuple[dict[str, Any], str | None]:
    """conversion.json (empty when absent) and the base model it, or the config, names."""
    conversion = read_json(model_dir / CONVERSION_FILE)
    conversion = conversion if isinstance(conversion, dict) else {}
    base_model = conversion.get("base_model") or getattr(config, "base_model", None)
    return conversion, base_model if isinstance(base_model, str) and base_model else None
