#!/usr/bin/env bash
# Copy the ELTeC corpus (24 MB) into bench/gpu/data/ (git-ignored) so that it travels with the working tree to a
# GPU machine that cannot see ../shared.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SOURCE="${MOT_SHARED_DATA:-$ROOT/../shared/data}/eltec_eng/eltec_eng_level1_body.txt.gz"
if [ ! -f "$SOURCE" ]; then
  echo "bench/gpu/prepare.sh: error: no corpus at $SOURCE; set MOT_SHARED_DATA to the shared data folder" >&2
  exit 2
fi
mkdir -p "$ROOT/bench/gpu/data"
cp "$SOURCE" "$ROOT/bench/gpu/data/"
echo "copied $(du -h "$SOURCE" | cut -f1) to bench/gpu/data/"
