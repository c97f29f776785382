#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install the package into it. Idempotent and quick when
# nothing changed. Sourced by quickstart.sh and test.sh; run it alone to set up for interactive use.
#
# torch is installed first and pinned (TORCH_SPEC, default torch==2.13.0): an unpinned torch would pull the
# newest release, with gigabytes of CUDA wheels, even where a local CPU wheel of 2.13.0 is on offer. Users who
# want another build set e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOT_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0}"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install --quiet ${TORCH_SPEC:-torch==2.13.0}
fi
# TRANSFORMERS_SPEC (e.g. "transformers==5.9.0") pins transformers within pyproject's range; CI uses it to test the
# oldest release the range admits.
stamp="$VENV/.mot-installed"
want="$( (cat "$ROOT/pyproject.toml"; echo "${TRANSFORMERS_SPEC:-}") | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing mixture-of-tokens and its dependencies${TRANSFORMERS_SPEC:+ with $TRANSFORMERS_SPEC}"
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev]" ${TRANSFORMERS_SPEC:+"$TRANSFORMERS_SPEC"}
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
