#!/usr/bin/env bash
# The package as a user installs it: build the wheel, install it (not editable) into a fresh virtualenv, and run
# every command from a temporary folder outside the repository. Fails if a command fails, if an offline error is
# more than one line, or if anything is written inside the installed package. Run by .ci/run; alone:
#
#   bash scripts/wheel_check.sh [WORK_DIR]        # WORK_DIR (default: a new temporary folder) is left behind
#
# PIN (e.g. "transformers==5.9.0") pins a dependency within pyproject's range: .ci/run checks the wheel on the range's
# lower bound and then reuses WORK_DIR/venv for that release's model tests.
#
# The zero-shot step reads PIQA from the shared data folder (MOT_SHARED_DATA, default ../shared/data beside the
# repository); without it that step is left out, except under CI=true, where it is an error.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
DATA="${MOT_SHARED_DATA:-$ROOT/../shared/data}"
VENV="$WORK/venv"
say() { echo "[wheel] $*"; }
fail() { echo "[wheel] FAILED: $*" >&2; exit 1; }

say "building the wheel and installing it into $VENV"
python3 -m venv "$VENV"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install --quiet ${TORCH_SPEC:-torch==2.13.0}
# Built from a copy of what the wheel ships (pyproject.toml: the package and the `mot` entry module): setuptools
# writes build/ and *.egg-info/ into the source folder.
mkdir -p "$WORK/src"
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/mixture_of_tokens" "$ROOT/mixture_of_tokens_console.py" \
  "$WORK/src/"
find "$WORK/src" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
"$VENV/bin/python" -m pip wheel --quiet --no-deps --wheel-dir "$WORK/dist" "$WORK/src"
wheel="$(ls "$WORK"/dist/mixture_of_tokens-*.whl)"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install --quiet "$wheel" ${PIN:-}
export PATH="$VENV/bin:$PATH"
unset PYTHONPATH

RUN="$WORK/run"
mkdir -p "$RUN"
cd "$RUN"
package="$(python -c 'import mixture_of_tokens, os; print(os.path.dirname(mixture_of_tokens.__file__))')"
case "$package" in "$ROOT"*) fail "mixture_of_tokens was imported from the repository ($package), not the wheel";; esac
if python -c "import experiments" 2>/dev/null; then fail "the wheel ships the reproduction (experiments)"; fi
# Every file of the package (byte code aside) and the names beside it in site-packages.
snapshot() {
  cd "$package/.." && find mixture_of_tokens -type f ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum && ls -a
}
before="$(snapshot)"  # $(...) runs it in a subshell: the cd stays there

one_line_error() {  # COMMAND...: must exit 2 with exactly one line on stderr
  local err status=0
  err="$("$@" 2>&1 >/dev/null)" || status=$?
  [ "$status" = 2 ] || fail "'$*' exited $status, not 2: $err"
  [ "$(printf '%s\n' "$err" | wc -l)" = 1 ] || fail "'$*' wrote more than one line: $err"
  say "  one line, as it should: $err"
}

say "mot train (tiny-mot, a few steps on the bundled Python docs) in $RUN"
mot train --preset tiny-mot --train_tokenizer 512 --output_dir model --block_size 32 --max_steps 8 \
  --per_device_train_batch_size 8 --per_device_eval_batch_size 8 --max_eval_blocks 16 --eval_steps 8 \
  --logging_steps 4 --save_strategy no --report_to none --disable_tqdm true --dataloader_num_workers 0
printf '%s\n' "The" "A" "In" "This" "When the" "If the" "Python" "The following" > prompts.txt
say "mot generate (one MoT group of eight prompts)"
mot generate model --prompts_file prompts.txt --max_new_tokens 8 --do_sample --seed 0
say "mot convert, then mot generate one prompt with Token Choice"
mot convert model model-tc
mot generate model-tc --prompt "The" --max_new_tokens 8
say "mot card, mot eval --perplexity"
mot card model
python -c "import json; print(json.__doc__)" > held_out.txt
mot eval model --perplexity held_out.txt
if [ -d "$DATA/piqa" ]; then
  say "mot eval --data_dir (PIQA, 4 documents)"
  mot eval model --tasks piqa --limit 4 --data_dir "$DATA" --output piqa.json
  [ -s piqa.json ] || fail "mot eval wrote no piqa.json"
elif [ "${CI:-}" = true ]; then
  fail "no shared data at $DATA (CI needs it for the zero-shot step)"
else
  say "no shared data at $DATA: the zero-shot step is left out"
fi
say "offline, every Hub command stops in one line"
one_line_error env HF_HUB_OFFLINE=1 MOT_EVAL_DATA= mot eval model --tasks piqa
one_line_error env HF_HUB_OFFLINE=1 mot push model someone/tiny-mot
one_line_error env HF_HUB_OFFLINE=1 mot pull someone/tiny-mot pulled

[ "$(snapshot)" = "$before" ] || fail "a command wrote inside or beside the installed package $package"
say "ok: the installed wheel trains, generates, converts, renders its card and evaluates from $RUN"
