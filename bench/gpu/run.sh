#!/usr/bin/env bash
# The GPU comparison in one command (docs/reproduce.md, "The GPU comparison"): on the GPU machine, from the
# repository root, with the corpus copied into bench/gpu/data/ beforehand (bench/gpu/prepare.sh, on a machine that
# has ../shared/data; the folder is git-ignored and small enough to send along).
#
#   bash bench/gpu/run.sh [OUT]          # OUT defaults to $OUT, else runs/gpu
#
# Installs the package without dependencies (the machine has torch and transformers, no package registry), then
# runs bench/gpu/compare.py with a 9-minute budget. Extra arguments after OUT go to compare.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUTDIR="${1:-${OUT:-$ROOT/runs/gpu}}"
shift || true
CORPUS="$ROOT/bench/gpu/data/eltec_eng_level1_body.txt.gz"
if [ ! -f "$CORPUS" ]; then
  echo "bench/gpu/run.sh: error: no corpus at $CORPUS; run bench/gpu/prepare.sh where ../shared/data exists" >&2
  exit 2
fi
python -c "import mixture_of_tokens" 2>/dev/null || python -m pip install --quiet --no-deps -e "$ROOT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python "$ROOT/bench/gpu/compare.py" --corpus "$CORPUS" --out "$OUTDIR" --minutes 9 "$@"
