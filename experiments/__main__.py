"""`python -m experiments`: the reproduction's command (experiments/runner.py; docs/reproduce.md)."""

import sys

from mixture_of_tokens.utils import UserError

from .runner import main

try:
    sys.exit(main(sys.argv[1:]))
except UserError as error:
    print(f"python -m experiments: error: {error}", file=sys.stderr)
    sys.exit(2)
