"""Offline data for lm-eval's stock PIQA, HellaSwag and ARC-Easy tasks.

The original releases (laid out as the table below lists) use other schemas than the Hugging Face Hub datasets that
lm-eval's tasks read. Each converter below turns one release file into exactly the documents the Hub dataset
holds, so that the stock task YAML (prompts, `process_docs`, metrics) runs on them unchanged; only where the data
comes from is overridden (`dataset_path: json`, `dataset_kwargs: {data_files: ...}`, `training_split: null`).

| task      | release files (under --data_dir)               | Hub dataset the stock task reads | split      |
|-----------|------------------------------------------------|----------------------------------|------------|
| piqa      | piqa/valid.jsonl + piqa/valid-labels.lst       | baber/piqa                       | validation |
| hellaswag | hellaswag/hellaswag_val.jsonl                  | Rowan/hellaswag                  | validation |
| arc_easy  | arc_easy/ARC-Easy-Test.jsonl                   | allenai/ai2_arc, ARC-Easy        | test       |
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..utils import UserError, atomic_write_text

# Names the folder of release files for the shipped lm-eval tasks (lm_eval_tasks/), and `mot eval --data_dir`'s default.
DATA_ENV = "MOT_EVAL_DATA"


def _read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}, line {line_number}: not valid JSON ({error.msg})") from None


def _require_keys(record: dict, keys: tuple[str, ...], path: Path, line_number: int) -> None:
    missing = [key for key in keys if key not in record]
    if missing:
        raise UserError(f"{path}, record {line_number}: missing field(s) {', '.join(missing)}; is this the original release file?")


def convert_piqa(data_dir: Path) -> list[dict]:
    """PIQA validation: questions and labels sit in two aligned files; the Hub copy joins them (label 0 or 1)."""
    questions_path, labels_path = data_dir / "piqa" / "valid.jsonl", data_dir / "piqa" / "valid-labels.lst"
    questions = list(_read_jsonl(questions_path))
    labels = [line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(questions) != len(labels):
        raise UserError(f"{questions_path} has {len(questions)} questions but {labels_path} has {len(labels)} labels")
    docs = []
    for number, (record, label) in enumerate(zip(questions, labels, strict=True), start=1):
        _require_keys(record, ("goal", "sol1", "sol2"), questions_path, number)
        if label not in ("0", "1"):
            raise UserError(f"{labels_path}, line {number}: label must be 0 or 1, got {label!r}")
        docs.append({"goal": record["goal"], "sol1": record["sol1"], "sol2": record["sol2"], "label": int(label)})
    return docs


_HELLASWAG_FIELDS = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split", "split_type",
                     "label")


def convert_hellaswag(data_dir: Path) -> list[dict]:
    """HellaSwag validation: same fields as the Hub's Rowan/hellaswag, whose `label` is a string ("0".."3").

    The stock task's `process_docs` (building `query`, `choices`, `gold` and stripping WikiHow's bracket tags) runs
    on these documents inside lm-eval, exactly as on the Hub copy; it is not repeated here.
    """
    path = data_dir / "hellaswag" / "hellaswag_val.jsonl"
    docs = []
    for number, record in enumerate(_read_jsonl(path), start=1):
        _require_keys(record, _HELLASWAG_FIELDS, path, number)
        doc = {field: record[field] for field in _HELLASWAG_FIELDS}
        doc["label"] = str(record["label"])
        docs.append(doc)
    return docs


def convert_arc(data_dir: Path, file_name: str = "ARC-Easy-Test.jsonl") -> list[dict]:
    """ARC: the release nests `question.stem` and `question.choices[{text, label}]`; the Hub flattens them into
    `question` (the stem) and `choices: {text: [...], label: [...]}`. Labels are kept as given (A-E or 1-5)."""
    path = data_dir / "arc_easy" / file_name
    docs = []
    for number, record in enumerate(_read_jsonl(path), start=1):
        _require_keys(record, ("id", "question", "answerKey"), path, number)
        question = record["question"]
        if not isinstance(question, dict) or "stem" not in question or "choices" not in question:
            raise UserError(f"{path}, record {number}: `question` must hold `stem` and `choices` (original ARC schema)")
        choices = question["choices"]
        docs.append({
            "id": record["id"],
            "question": question["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": record["answerKey"],
        })
    return docs


@dataclass(frozen=True)
class LocalTask:
    """How one stock task is fed from the original release files."""

    files: tuple[str, ...]  # relative to --data_dir
    convert: Callable[[Path], list[dict]]
    split: str  # the split the stock task evaluates on (its validation_split or test_split)


LOCAL_TASKS: dict[str, LocalTask] = {
    "piqa": LocalTask(("piqa/valid.jsonl", "piqa/valid-labels.lst"), convert_piqa, "validation"),
    "hellaswag": LocalTask(("hellaswag/hellaswag_val.jsonl",), convert_hellaswag, "validation"),
    "arc_easy": LocalTask(("arc_easy/ARC-Easy-Test.jsonl",), convert_arc, "test"),
}


def check_data_dir(data_dir: str | os.PathLike, tasks: list[str]) -> Path:
    """Fail with one clear message if `data_dir` lacks a file one of `tasks` needs, or a task has no local data."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data_dir {data_dir} is not a folder")
    for task in tasks:
        if task not in LOCAL_TASKS:
            raise UserError(f"task {task!r} cannot run from --data_dir; local data exists for: {', '.join(LOCAL_TASKS)}")
        for relative in LOCAL_TASKS[task].files:
            if not (data_dir / relative).is_file():
                raise UserError(f"--data_dir {data_dir} is missing {relative} (needed by task {task!r})")
    return data_dir


def default_cache_dir() -> Path:
    root = os.environ.get("MOT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mixture_of_tokens")
    return Path(root) / "eval_data"


def _fingerprint(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _write_jsonl_atomically(docs: list[dict], destination: Path) -> None:
    atomic_write_text(destination, "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs))


def prepare_local_file(task: str, data_dir: Path, cache_dir: Path | None = None) -> Path:
    """Convert `task`'s release files into Hub-schema JSON lines, cached by the sources' content hash.

    The cache keeps the converted file's path (and so the `datasets` cache entry built from it) stable across runs.
    """
    spec = LOCAL_TASKS[task]
    sources = [data_dir / relative for relative in spec.files]
    destination = (cache_dir or default_cache_dir()) / f"{task}-{spec.split}-{_fingerprint(sources)}.jsonl"
    if not destination.is_file():
        _write_jsonl_atomically(spec.convert(data_dir), destination)
    return destination


def local_task_overrides(task: str, data_file: Path) -> dict:
    """The keys that make a stock task read `data_file` instead of its Hub dataset. Everything else (prompt,
    process_docs, metrics) stays as in the installed YAML."""
    split = LOCAL_TASKS[task].split
    return {
        "dataset_path": "json",
        "dataset_name": None,  # the Hub config name (ARC's "ARC-Easy") means nothing to the json builder
        "dataset_kwargs": {"data_files": {split: str(data_file)}},
        # Only the evaluated split exists locally; a split left named would be looked up (e.g. for few-shot docs)
        # and fail. The stock tasks evaluate on their test split if they have one, else validation: unchanged here.
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
    }


__all__ = ["DATA_ENV", "LOCAL_TASKS", "convert_piqa", "convert_hellaswag", "convert_arc", "check_data_dir",
           "prepare_local_file", "local_task_overrides"]
