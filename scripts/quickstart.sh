#!/usr/bin/env bash
# Quick start: set up the virtualenv, pretrain a small Mixture of Tokens model (`tiny-mot`, 2.5M parameters) on text
# that ships with Python itself (the pydoc topics, ~0.5 MB), so nothing has to be downloaded, then sample from it.
# About 1-2 minutes on a 2-core CPU once set up (400 steps: enough for recognisable words); prints the final eval
# loss, eight samples and what to do next.
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
  --learning_rate 3e-3 --warmup_steps 20 \
  --max_steps 400 \
  --logging_steps 20 --eval_steps 200 --save_steps 200 \
  "$@"

# A MoT model generates for a batch: eight prompts are one full group of tiny-mot (group_size 8). Sampling, because
# greedy decoding of a model this small repeats its most frequent tokens (spaces and newlines of the docs text).
# The prompts and a held-out text (module docstrings of the standard library: not in the training text) stay in
# $OUT-examples, so the next steps printed below run as printed.
EXAMPLES="$OUT-examples"
mkdir -p "$EXAMPLES"
PROMPTS="$EXAMPLES/prompts.txt"
HELD_OUT="$EXAMPLES/held_out.txt"
PROMPTS_EXAMPLE="$PROMPTS"
printf '%s\n' "The" "A" "In" "This" "When the" "If the" "Python" "The following" > "$PROMPTS"
python - "$HELD_OUT" <<'PY'
import importlib, sys
names = ["argparse", "collections", "csv", "datetime", "decimal", "difflib", "fractions", "heapq", "json",
         "logging", "pathlib", "pickle", "random", "shutil", "statistics", "string", "textwrap", "typing"]
text = "\n\n".join(importlib.import_module(name).__doc__ or "" for name in names)
open(sys.argv[1], "w", encoding="utf-8").write(text)
PY
echo
echo "[quickstart] eight samples from $OUT (one full MoT group):"
mot generate "$OUT" --prompts_file "$PROMPTS" --max_new_tokens 24 --do_sample --temperature 0.8 --top_p 0.95 --seed 0

cat <<NEXT

[quickstart] next steps (run them with $VENV/bin/ on the path: source $VENV/bin/activate)
  mot generate $OUT --prompts_file "$PROMPTS_EXAMPLE" --do_sample --temperature 0.8   # one prompt per line, one batch
  mot transition $OUT ${OUT}-tc --steps 40         # into Token Choice: generates one prompt at a time
  mot generate ${OUT}-tc --prompt "The" --do_sample --temperature 0.8 --stream
  mot eval $OUT --perplexity "$HELD_OUT"          # perplexity on held-out text (any .txt file)
  mot eval $OUT --data_dir ../shared/data         # zero-shot PIQA/HellaSwag/ARC-Easy from their release files;
                                                  # with the Hub reachable, plain: mot eval $OUT
  mot card $OUT                                    # the model card; mot push $OUT you/tiny-mot needs the Hub and a login
  bash scripts/quickstart.sh --dataset FILE_OR_HUB_DATASET --max_steps 2000    # your own text
NEXT
