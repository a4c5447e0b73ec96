#!/usr/bin/env bash
# Bottleneck adapters on the embedded default (edit or override from the environment; see tune.sh).
export TUNE_METHOD=adapter
# Sizes for the embedded default from models/sizes.py (the one table; PAPER=1 takes its "paper" profile).
eval "$("${PYTHON_FOR_SIZES:-python3}" "$(dirname "$0")/../models/sizes.py" --shell "$([[ -n "${PAPER:-}" ]] && echo paper || echo default)" adapter)"
: "${LRS:=3e-3}"
export LRS EXTRA_ARGS="--adapter_type $ADAPTER_TYPE --adapter_size $ADAPTER_SIZE ${EXTRA_ARGS:-}"
exec bash "$(dirname "$0")/tune.sh" "$@"
