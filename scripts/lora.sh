#!/usr/bin/env bash
# LoRA on the embedded default (edit or override from the environment; see tune.sh).
export TUNE_METHOD=lora
# Sizes for the embedded default from models/sizes.py (the one table; PAPER=1 takes its "paper" profile).
eval "$("${PYTHON_FOR_SIZES:-python3}" "$(dirname "$0")/../models/sizes.py" --shell "$([[ -n "${PAPER:-}" ]] && echo paper || echo default)" lora)"
: "${LRS:=3e-3}"
export LRS EXTRA_ARGS="--lora_r $LORA_R --lora_alpha $LORA_ALPHA ${EXTRA_ARGS:-}"
exec bash "$(dirname "$0")/tune.sh" "$@"
