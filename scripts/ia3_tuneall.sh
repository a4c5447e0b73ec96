#!/usr/bin/env bash
# Tune-all with (IA)³ sources: each source tuned on each target (leave-one-out).
# Variables (TASKS, SOURCE_CKPT_PATH, OUTPUT_DIR, STEPS, LR, ...) are described in tuneall.sh; the environment
# overrides them.
: "${DELTA:=ia3}"
: "${LR:=3e-2}"                                   # as scripts/ia3.sh
export DELTA LR
exec bash "$(dirname "$0")/tuneall.sh" "$@"
