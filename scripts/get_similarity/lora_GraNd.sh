#!/usr/bin/env bash
# GraNd, LoRA sources: per-example gradient norm of each source module on the target's dev split (lower: more similar).
# Variables (TASKS, SOURCE_CKPT_PATH, GRANULARITY, ...) are described in run.sh; the environment overrides them.
: "${DELTA:=lora}"
: "${METRIC:=GraNd}"
export DELTA METRIC
exec bash "$(dirname "$0")/run.sh" "$@"
