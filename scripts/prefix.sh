#!/usr/bin/env bash
# Prefix tuning on the embedded default (edit or override from the environment; see tune.sh).
export TUNE_METHOD=prefix
# Sizes for the embedded default from models/sizes.py (the one table; PAPER=1 takes its "paper" profile).
eval "$("${PYTHON_FOR_SIZES:-python3}" "$(dirname "$0")/../models/sizes.py" --shell "$([[ -n "${PAPER:-}" ]] && echo paper || echo default)" prefix)"
: "${LRS:=3e-3}"
# Prefix tuning learns slower than LoRA or adapters: with 200 steps it stays at the majority label on
# the entailment tasks; 800 steps reach 0.90-0.98 there.
: "${TRAIN_ITERS:=800}"
: "${WARMUP_STEPS:=40}"
: "${VALID_INTERVAL:=100}"
export LRS TRAIN_ITERS WARMUP_STEPS VALID_INTERVAL EXTRA_ARGS="--prefix_length $PREFIX_LENGTH --prefix_mlp $PREFIX_MLP ${EXTRA_ARGS:-}"
exec bash "$(dirname "$0")/tune.sh" "$@"
