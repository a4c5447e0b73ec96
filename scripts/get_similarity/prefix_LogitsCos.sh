#!/usr/bin/env bash
# LogitsCos, prefix-tuning sources: cosine of each source's token distribution with the target's dev answers (higher: more similar).
# Variables (TASKS, SOURCE_CKPT_PATH, GRANULARITY, ...) are described in run.sh; the environment overrides them.
: "${DELTA:=prefix}"
: "${METRIC:=LogitsCos}"
export DELTA METRIC
exec bash "$(dirname "$0")/run.sh" "$@"
