#!/usr/bin/env bash
# Dev-all with (IA)³ sources: zero-shot and after-tune-all dev scores on each target (leave-one-out).
# Variables (TASKS, SOURCE_CKPT_PATH, OUTPUT_DIR, OUTPUT, ...) are described in devall.sh; the environment
# overrides them.
: "${DELTA:=ia3}"
export DELTA
exec bash "$(dirname "$0")/devall.sh" "$@"
