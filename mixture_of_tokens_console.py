"""The `mot` console script's entry point, kept outside the `mixture_of_tokens` package on purpose.

Python runs a package's `__init__` before any module of the package, and `mixture_of_tokens/__init__.py` registers
the model classes with transformers' Auto classes, which imports torch and transformers' modeling code (seconds). A
`mot` process that only prints help or the version uses no model, and only code that runs before that `__init__` can
say so: this module sets `USES_NO_MODEL`, which the package reads, and then hands the command line to
`mixture_of_tokens.cli`.
"""

from __future__ import annotations

import sys

# Read by mixture_of_tokens/__init__.py: True while this process only prints help or the version.
USES_NO_MODEL = False


def uses_no_model(argv: list[str]) -> bool:
    """Whether `mot ARGV` only prints help or the version: the usage (`mot`, `mot help`, `mot -h`), the version
    (`mot -V`), or a command's help (argparse prints it wherever `-h` or `--help` stands)."""
    return not argv or argv[0] in ("help", "-V", "--version") or any(arg in ("-h", "--help") for arg in argv)


def main() -> int:
    global USES_NO_MODEL
    USES_NO_MODEL = uses_no_model(sys.argv[1:])
    from mixture_of_tokens.cli import main as run_command

    return run_command()
