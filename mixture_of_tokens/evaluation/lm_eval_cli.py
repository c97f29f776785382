"""`mot lm-eval`: lm-evaluation-harness's own command line, with the batch-aware `mot` model registered.

    mot lm-eval --model mot --model_args pretrained=DIR[,mot_routing=discrete] [--batch_size B] --tasks piqa ...
    mot lm-eval --help

Every flag goes to lm-eval unchanged (lm-eval 0.4 finds no models in installed packages, so `lm_eval --model mot`
cannot work; this command imports `mixture_of_tokens.evaluation.lm_eval_model`, which registers `MoTLM` as `mot`, then runs
lm-eval's entry point). `--model hf` and every other lm-eval model work as with `lm_eval`. Three things differ from
`lm_eval`, all about what gets printed or which batch size a MoT model uses:

* with `--model mot` and no `--batch_size` (nor `--config`), the batch size is the model's `group_size`, not
  lm-eval's default of 1, which would put every sequence of a MoT model in a group of its own;
* `fatal: not a git repository` (git asked for the working folder's commit outside a repository) is not printed;
* lm-eval's notice that a task of `--include_path` overrides the stock task of the same name is not printed for the
  task folder shipped here (`python -m mixture_of_tokens.evaluation.lm_eval_tasks`), whose tasks do exactly that by design.
"""

from __future__ import annotations

import sys

from .eval_data import DATA_ENV
from .lm_eval_tasks import TASKS_DIR

_OVERRIDE_NOTICE = "Task '%s' from %s overrides existing task from %s"


def names_batch_size(argv: list[str]) -> bool:
    """Whether lm-eval's command line `argv` sets the batch size: `--batch_size`/`-b` in any spelling argparse
    accepts (`--batch_size=8`, `-b8`, an unambiguous prefix such as `--batch`), or a `--config` file, which may."""
    for token in argv:
        if token == "--":
            break
        name = token.split("=", 1)[0]
        if name.startswith("--") and len(name) > 2 and ("--batch_size".startswith(name) or "--config".startswith(name)):
            return True
        if not name.startswith("--") and name[:2] in ("-b", "-C"):
            return True
    return False


def _is_our_override_notice(record) -> bool:
    return (record.msg == _OVERRIDE_NOTICE and len(record.args or ()) == 3
            and str(record.args[1]).startswith(str(TASKS_DIR)))


class _DropOurOverrideNotices:
    """A logging filter: drops lm-eval's override notices for the shipped tasks (see the module docstring)."""

    def filter(self, record) -> bool:
        return not _is_our_override_notice(record)


HELP_EPILOG = f"""
mot lm-eval: lm-eval's command line with the batch-aware `mot` model registered (--model mot).
  MoT models:  mot lm-eval --model mot --model_args pretrained=DIR [--batch_size B] --tasks piqa,hellaswag,arc_easy
               (batch size default: the model's group_size; MoT scores depend on it, see docs/evaluation.md)
  offline:     {DATA_ENV}=DIR_WITH_RELEASE_FILES mot lm-eval ... --include_path {TASKS_DIR} --tasks piqa
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import logging

    from lm_eval.__main__ import cli_evaluate

    from .lm_eval_model import MoTLM, git_commit_recorded_quietly

    index_logger = logging.getLogger("lm_eval.tasks._index")
    drop_notices = _DropOurOverrideNotices()
    saved_argv, saved_default = sys.argv, MoTLM.cli_batch_size_is_default
    # lm-eval's entry point reads sys.argv; its program name stays lm-eval's own in its messages.
    sys.argv = ["lm-eval", *argv]
    MoTLM.cli_batch_size_is_default = not names_batch_size(argv)
    index_logger.addFilter(drop_notices)
    try:
        with git_commit_recorded_quietly():
            cli_evaluate()
        code = 0
    except SystemExit as exit_:  # argparse (--help, bad flags) and lm-eval end with sys.exit
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
    finally:
        sys.argv, MoTLM.cli_batch_size_is_default = saved_argv, saved_default
        index_logger.removeFilter(drop_notices)
    if code == 0 and (not argv or argv[0] in ("-h", "--help")):
        print(HELP_EPILOG)
    return code


__all__ = ["main", "names_batch_size"]
