"""The `mot` command: one sub-command per task, each implemented in its own module.

Every sub-command module exposes a function taking `argv` (a list of strings) and returning an exit code.
Modules are imported lazily so `mot --help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

from .utils import UserError

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mixture_of_tokens.training.train:main", "pretrain a MoT (or dense/Token Choice) model with Trainer"),
    "convert": ("mixture_of_tokens.conversion.convert:convert_main", "turn a MoT checkpoint into Token Choice (or back)"),
    "transition": ("mixture_of_tokens.conversion.convert:transition_main", "convert to Token Choice and keep training"),
    "generate": ("mixture_of_tokens.generate:main", "generate text, streaming tokens as they come"),
    "eval": ("mixture_of_tokens.evaluation.evaluation:main", "zero-shot lm-eval tasks (PIQA, HellaSwag, ARC-Easy), perplexity"),
    "lm-eval": ("mixture_of_tokens.evaluation.lm_eval_cli:main",
                "lm-evaluation-harness's command line, with the batch-aware `mot` model registered"),
    "card": ("mixture_of_tokens.folders.cards:main", "render or refresh a model folder's README.md model card"),
    "push": ("mixture_of_tokens.folders.hub:push_main", "upload a model folder to the Hugging Face Hub"),
    "pull": ("mixture_of_tokens.folders.hub:pull_main", "download a model from the Hub into a folder"),
    "serve": ("mixture_of_tokens.serve:main", "serve a dense or Token Choice model over an OpenAI-compatible HTTP API"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mot COMMAND [options]   (mot COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mot: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name = COMMANDS[name][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    try:
        return int(function(rest) or 0)
    except UserError as error:
        print(f"mot {name}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
