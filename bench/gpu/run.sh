#!/usr/bin/env bash
# The GPU comparison in one command (docs/reproduce.md, "The GPU comparison"). On the GPU machine, from the
# repository root, with the corpus copied into bench/gpu/data/ beforehand (bench/gpu/prepare.sh, on a machine that
# has ../shared/data; the folder is git-ignored, so the device call must carry it):
#
#   bash bench/gpu/run.sh [OUT] [compare.py arguments...]   # OUT defaults to $OUT, else runs/gpu
#   bash bench/gpu/run.sh OUT --toy --device cpu            # the same at toy size on a CPU (tests/test_gpu_compare.py)
#
# Made for a machine with torch and transformers but no `python` on PATH, no package registry and this package not
# installed: it runs `python3` (or $PYTHON), never installs anything, and puts the repository first on PYTHONPATH so
# that compare.py and every process it starts import this checkout's package. Before anything else it checks that
# the corpus is there and that torch and transformers (each at least its lower bound in pyproject.toml), tokenizers
# and this package (from this checkout) import with that interpreter; what is wrong is one line on stderr, exit 2. Then
# compare.py runs with a 9-minute budget; its exit status (1 when a figure is missing) is this script's.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
NAME="bench/gpu/run.sh"
OUTDIR="${OUT:-$ROOT/runs/gpu}"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  OUTDIR="$1"
  shift
fi
CORPUS="$ROOT/bench/gpu/data/eltec_eng_level1_body.txt.gz"
if [ ! -f "$CORPUS" ]; then
  echo "$NAME: error: no corpus at $CORPUS; run bash bench/gpu/prepare.sh where ../shared/data exists, and carry bench/gpu/data to this machine" >&2
  exit 2
fi
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "$NAME: error: no $PY on PATH; set PYTHON to an interpreter that has torch and transformers" >&2
  exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PIP_NO_INDEX=1  # nothing here installs packages; should anything try, it fails at once instead of hanging

"$PY" - "$ROOT" <<'PYTHON' || exit 2
import re
import sys
from pathlib import Path

root = Path(sys.argv[1])


def fail(message: str) -> None:
    print(f"bench/gpu/run.sh: error: {message}", file=sys.stderr)
    sys.exit(2)


def release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as 2.11.0+cu128 or 5.17.0.dev0."""
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    return tuple(int(part or 0) for part in match.groups()) if match else (0,)


pyproject = (root / "pyproject.toml").read_text()
found = {}
for name in ("torch", "transformers", "tokenizers"):
    try:
        found[name] = __import__(name).__version__
    except Exception as error:
        fail(f"{name} does not import with {sys.executable} ({type(error).__name__}: {error})")
bounds = {}
for name in ("torch", "transformers"):
    bound = re.search(rf'"{name}\s*>=\s*([0-9][0-9.]*)', pyproject)
    if bound is None:
        fail(f"pyproject.toml names no lower bound for {name} (\"{name}>=X\")")
    bounds[name] = bound.group(1)
    if release(found[name]) < release(bounds[name]):
        fail(f"{name} {found[name]} is older than {bounds[name]}, the lower bound in pyproject.toml")
try:
    import mixture_of_tokens
except Exception as error:
    fail(f"mixture_of_tokens does not import from {root} ({type(error).__name__}: {error})")
if Path(mixture_of_tokens.__file__).resolve().parent != (root / "mixture_of_tokens").resolve():
    fail(f"mixture_of_tokens imports from {Path(mixture_of_tokens.__file__).parent}, not from {root}")
print(f"bench/gpu/run.sh: python {sys.version.split()[0]} ({sys.executable}), torch {found['torch']} "
      f"(>= {bounds['torch']}), transformers {found['transformers']} (>= {bounds['transformers']}), "
      f"tokenizers {found['tokenizers']}, mixture_of_tokens from {root}",
      flush=True)
PYTHON

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PY" "$ROOT/bench/gpu/compare.py" --corpus "$CORPUS" --out "$OUTDIR" --minutes 9 "$@"
