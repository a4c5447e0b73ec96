#!/usr/bin/env bash
# Tune-all with prefix-tuning sources: each source tuned on each target (leave-one-out).
# Variables (TASKS, SOURCE_CKPT_PATH, OUTPUT_DIR, STEPS, LR, ...) are described in tuneall.sh; the environment
# overrides them.
: "${DELTA:=prefix}"
: "${LR:=3e-3}"                                   # as scripts/prefix.sh
export DELTA LR
exec bash "$(dirname "$0")/tuneall.sh" "$@"
