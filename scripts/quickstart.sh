#!/usr/bin/env bash
# Quick start: set up the virtualenv, then pretrain a small Mixture of Tokens model (`tiny-mot`, 2.5M parameters)
# on text that ships with Python itself (the pydoc topics, ~0.5 MB), so nothing has to be downloaded. A few
# minutes on a 2-core CPU; prints the final eval loss and where the model is.
#
#   scripts/quickstart.sh                          # model in runs/quickstart-tiny-mot
#   scripts/quickstart.sh --dataset ../shared/data/eltec_eng/eltec_eng_level1_body.txt.gz --max_train_blocks 4000
#
# Extra arguments go to `mot train` (they override the ones below). OUT=folder chooses the output folder.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
OUT="${OUT:-$ROOT/runs/quickstart-tiny-mot}"

mot train \
  --preset tiny-mot \
  --train_tokenizer 4096 \
  --output_dir "$OUT" --overwrite_output_dir \
  --block_size 128 \
  --per_device_train_batch_size 16 --per_device_eval_batch_size 16 \
  --learning_rate 3e-3 --warmup_steps 10 \
  --max_steps 100 \
  --logging_steps 10 --eval_steps 50 --save_steps 50 \
  "$@"
