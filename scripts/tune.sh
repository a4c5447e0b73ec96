#!/usr/bin/env bash
# Shared sweep around tune.py; adapter.sh, lora.sh and prefix.sh set the method and exec this.
# Every variable below can be overridden from the environment, e.g.
#   TASKS=ALL_TASKS LRS="1e-3 3e-3" OUTPUT_DIR=runs/my_sweep bash scripts/lora.sh
# JOBS=4 runs 4 (task, lr, bsz) runs at once; SLURM=1 (+ SLURM_PARTITION, SLURM_GPUS, ...) submits one Slurm
# job array (scripts/jobs.sh lists the variables). DRY_RUN=1 prints the command instead of running it.
# A rerun resumes: finished runs of the same settings are skipped, and a run folder of other settings is refused;
# OVERWRITE=1 replaces them instead.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${TUNE_METHOD:?set by adapter.sh, lora.sh or prefix.sh}"
: "${MODEL:=models/default}"              # backbone folder or hub id
: "${TOKENIZER:=$MODEL}"
: "${TASK_DIR:=data/synthetic}"
: "${TASKS:=SAMPLE_TASKS}"                # task names or a list from task_list.py
: "${K:=512}"                             # the bundled suite's large split: source modules
: "${DATA_SEED:=100}"
: "${OUTPUT_DIR:=runs/sources/${TUNE_METHOD}}"
: "${DEVICE:=auto}"
: "${GROUP_SIZE:=auto}"                          # modules per forward pass (auto: what fits); 1: one at a time
: "${LRS:=3e-3}"
: "${BSZS:=16}"
: "${TRAIN_ITERS:=200}"
: "${WARMUP_STEPS:=}"  # empty: a tenth of TRAIN_ITERS (the rule of tune.py and the study)
: "${VALID_INTERVAL:=50}"
: "${EARLY_STOP:=3}"
: "${SEED:=42}"
: "${PYTHON:=.venv/bin/python}"
: "${EXTRA_ARGS:=}"                       # method sizes come from the calling script

# shellcheck disable=SC2206  # LRS, BSZS, TASKS and the size flags are word lists on purpose
if [[ "${OVERWRITE:-0}" == 1 ]]; then rerun=--overwrite; else rerun=--resume; fi
args=(--do_train --do_predict --quiet "$rerun"
      --tune_method "$TUNE_METHOD" --model "$MODEL" --tokenizer_path "$TOKENIZER"
      --task_dir "$TASK_DIR" --tasks $TASKS --k "$K" --data_seed "$DATA_SEED"
      --output_dir "$OUTPUT_DIR" --device "$DEVICE" --group_size "$GROUP_SIZE" --seed "$SEED"
      --learning_rate_list $LRS --bsz_list $BSZS --train_iters "$TRAIN_ITERS"
      --valid_interval "$VALID_INTERVAL" --early_stop "$EARLY_STOP"
      --predict_batch_size 100 --max_output_length 16 $EXTRA_ARGS "$@")
[[ -n "$WARMUP_STEPS" ]] && args+=(--warmup_steps "$WARMUP_STEPS")
# JOBS=N or SLURM=1: one process per (task, lr, bsz) through sweep.py (see scripts/jobs.sh).
source scripts/jobs.sh
if (( ${#LAUNCH[@]} )); then
    cmd=("$PYTHON" sweep.py "${LAUNCH[@]}" tune "${args[@]}")
else
    cmd=("$PYTHON" tune.py "${args[@]}")
fi
if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
