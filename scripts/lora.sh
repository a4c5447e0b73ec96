#!/usr/bin/env bash
# LoRA on the embedded default (edit or override from the environment; see tune.sh).
export TUNE_METHOD=lora
source "$(dirname "$0")/sizes.sh" lora  # sizes from models/sizes.py (PAPER=1: the paper's)
: "${LRS:=3e-3}"
export LRS EXTRA_ARGS="--lora_r $LORA_R --lora_alpha $LORA_ALPHA --lora_targets $LORA_TARGETS ${EXTRA_ARGS:-}"
exec bash "$(dirname "$0")/tune.sh" "$@"
