#!/usr/bin/env bash
# (IA)³ on the embedded default (edit or override from the environment; see tune.sh). It has no sizes to set.
export TUNE_METHOD=ia3
source "$(dirname "$0")/sizes.sh" ia3  # nothing to set today; kept so a future size lands in one place
: "${LRS:=3e-2}"  # rescaling vectors start at one and need larger steps than the additive methods
export LRS EXTRA_ARGS="${EXTRA_ARGS:-}"
exec bash "$(dirname "$0")/tune.sh" "$@"
