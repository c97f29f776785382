"""lm-evaluation-harness task definitions that run the stock `piqa`, `hellaswag` and `arc_easy` offline.

Each YAML here repeats the stock task's prompt, target, choices, processing and metrics field for field (the tests
compare them with the installed lm-eval's YAML) and replaces only where the documents come from: a `custom_dataset`
function (`utils.py`) that reads the original release files from the folder named by the environment variable
`MOT_EVAL_DATA` (the original releases, laid out as `mixture_of_tokens.evaluation.eval_data` lists), converted by `mixture_of_tokens.evaluation.eval_data` exactly as
`mot eval --data_dir` converts them. The tasks keep the stock names, so `--include_path` this folder replaces the
Hub-backed tasks of the same name for that run:

    MOT_EVAL_DATA=path/to/releases lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True \\
        --include_path "$(python -m mixture_of_tokens.evaluation.lm_eval_tasks)" --tasks piqa,hellaswag,arc_easy

`python -m mixture_of_tokens.evaluation.lm_eval_tasks` prints this folder.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent

__all__ = ["TASKS_DIR"]
