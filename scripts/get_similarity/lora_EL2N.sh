#!/usr/bin/env bash
# EL2N, LoRA sources: error L2 norm of each source's token distribution on the target's dev answers (lower: more similar).
# Variables (TASKS, SOURCE_CKPT_PATH, GRANULARITY, ...) are described in run.sh; the environment overrides them.
: "${DELTA:=lora}"
: "${METRIC:=EL2N}"
export DELTA METRIC
exec bash "$(dirname "$0")/run.sh" "$@"
