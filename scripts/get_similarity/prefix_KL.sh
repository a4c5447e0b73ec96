#!/usr/bin/env bash
# KL, prefix-tuning sources: KL(P_t || p_s) from the target's random-init tuned module to each source (lower: more similar).
# Variables (TASKS, SOURCE_CKPT_PATH, GRANULARITY, ...) are described in run.sh; the environment overrides them.
: "${DELTA:=prefix}"
: "${METRIC:=KL}"
export DELTA METRIC
exec bash "$(dirname "$0")/run.sh" "$@"
