#!/usr/bin/env bash
# Bottleneck adapters on the embedded default (edit or override from the environment; see tune.sh).
export TUNE_METHOD=adapter
source "$(dirname "$0")/sizes.sh" adapter  # sizes from models/sizes.py (PAPER=1: the paper's)
: "${LRS:=3e-3}"
export LRS EXTRA_ARGS="--adapter_type $ADAPTER_TYPE --adapter_size $ADAPTER_SIZE ${EXTRA_ARGS:-}"
exec bash "$(dirname "$0")/tune.sh" "$@"
