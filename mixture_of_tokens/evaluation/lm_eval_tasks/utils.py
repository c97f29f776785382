"""Where the shipped tasks get their documents: the original release files in `$MOT_EVAL_DATA`.

lm-eval loads this file by its path (`!function utils.load_piqa` in the YAML next to it), so it imports the package
by absolute name. The documents are built by the same code as `mot eval --data_dir` (`mixture_of_tokens.evaluation.eval_data`:
convert once into the Hub schema, cache by content hash, read with the `json` builder), so both give the same scores.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lm_eval.tasks.hellaswag.utils import process_docs as process_hellaswag  # lm-eval's own HellaSwag cleanup

from mixture_of_tokens.evaluation.eval_data import DATA_ENV, LOCAL_TASKS, prepare_local_file
from mixture_of_tokens.utils import UserError


class _DropCustomDatasetHint(logging.Filter):
    """lm-eval logs, for every task read through `custom_dataset`, a hint that task kwargs go in `--metadata`. Our
    tasks take none (the data folder comes from the environment), so the hint would only mislead; it is dropped for
    these three tasks and nothing else."""

    mot_tasks_filter = True
    prefixes = tuple(f"{task}: Custom kwargs can be passed to `--metadata`" for task in LOCAL_TASKS)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_task_logger = logging.getLogger("lm_eval.api.task")
if not any(getattr(existing, "mot_tasks_filter", False) for existing in _task_logger.filters):
    _task_logger.addFilter(_DropCustomDatasetHint())


def data_dir() -> Path:
    """The folder named by $MOT_EVAL_DATA, or one clear error."""
    value = os.environ.get(DATA_ENV, "")
    if not value.strip():
        raise UserError(f"{DATA_ENV} is not set; set it to the folder holding piqa/, hellaswag/ and arc_easy/ in "
                        f"their release formats (piqa/valid.jsonl and valid-labels.lst, hellaswag/hellaswag_val.jsonl, "
                        "arc_easy/ARC-Easy-Test.jsonl)")
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise UserError(f"{DATA_ENV}={value} is not a folder; it must hold piqa/, hellaswag/ and arc_easy/")
    return folder


def load_documents(task: str):
    """The `task` split the stock task evaluates on, as a `datasets.DatasetDict` with that one split."""
    import datasets

    folder = data_dir()
    for relative in LOCAL_TASKS[task].files:
        if not (folder / relative).is_file():
            raise UserError(f"{DATA_ENV}={folder} is missing {relative} (needed by task {task!r})")
    converted = prepare_local_file(task, folder)
    split = LOCAL_TASKS[task].split
    return datasets.load_dataset("json", data_files={split: str(converted)})


# lm-eval calls `custom_dataset(**task metadata)`; the metadata (model arguments, version, ...) is not needed here.
def load_piqa(**_metadata):
    return load_documents("piqa")


def load_hellaswag(**_metadata):
    return load_documents("hellaswag")


def load_arc_easy(**_metadata):
    return load_documents("arc_easy")


__all__ = ["load_piqa", "load_hellaswag", "load_arc_easy", "process_hellaswag", "data_dir", "load_documents"]
