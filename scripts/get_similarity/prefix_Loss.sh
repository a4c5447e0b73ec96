#!/usr/bin/env bash
# Loss, prefix-tuning sources: mean token loss of the target's dev answers under each source module (lower: more similar).
# Variables (TASKS, SOURCE_CKPT_PATH, GRANULARITY, ...) are described in run.sh; the environment overrides them.
: "${DELTA:=prefix}"
: "${METRIC:=Loss}"
export DELTA METRIC
exec bash "$(dirname "$0")/run.sh" "$@"
