"""Small-scale reproduction of the paper's claims: `python bench/reproduce.py [--output_dir DIR] [--smoke] [--resume]`.

A thin wrapper around `mot reproduce` (mixture_of_tokens/experiments/); see docs/reproduce.md.
"""

import sys

from mixture_of_tokens.experiments.runner import main
from mixture_of_tokens.utils import UserError

if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as error:
        print(f"bench/reproduce.py: error: {error}", file=sys.stderr)
        sys.exit(2)
