#!/usr/bin/env bash
# Prefix tuning on the embedded default (edit or override from the environment; see tune.sh).
export TUNE_METHOD=prefix
: "${PREFIX_LENGTH:=16}"
: "${PREFIX_MLP:=64}"
: "${LRS:=9e-3}"
export LRS EXTRA_ARGS="--prefix_length $PREFIX_LENGTH --prefix_mlp $PREFIX_MLP ${EXTRA_ARGS:-}"
exec bash "$(dirname "$0")/tune.sh" "$@"
