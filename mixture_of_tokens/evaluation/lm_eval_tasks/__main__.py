"""Print the task folder, for `--include_path "$(python -m mixture_of_tokens.evaluation.lm_eval_tasks)"`."""

from mixture_of_tokens.evaluation.lm_eval_tasks import TASKS_DIR

print(TASKS_DIR)
