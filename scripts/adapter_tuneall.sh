#!/usr/bin/env bash
# Tune-all with bottleneck adapter sources: each source tuned on each target (leave-one-out).
# Variables (TASKS, SOURCE_CKPT_PATH, OUTPUT_DIR, STEPS, LR, ...) are described in tuneall.sh; the environment
# overrides them.
: "${DELTA:=adapter}"
: "${LR:=3e-3}"                                   # as scripts/adapter.sh
export DELTA LR
exec bash "$(dirname "$0")/tuneall.sh" "$@"
