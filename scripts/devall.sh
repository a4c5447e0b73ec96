#!/usr/bin/env bash
# Dev-all (get_similarity/dev_all.py): each source module's dev score on each target, zero-shot and after
# tune-all (scripts/tuneall.sh), for the Performance fusion method. The thin scripts
# {adapter,lora,prefix}_devall.sh set DELTA and exec this. Every variable below can be overridden from the
# environment, e.g.
#   TASKS=SAMPLE_TASKS DEVICE=cpu bash scripts/lora_devall.sh
# JOBS=4 scores 4 pairs at once; SLURM=1 (+ SLURM_PARTITION, SLURM_GPUS, ...) submits one Slurm job array
# (scripts/jobs.sh lists the variables). DRY_RUN=1 prints the command instead of running it. Relative paths
# are relative to the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${DELTA:?set DELTA to adapter, lora or prefix (or use one of the thin scripts)}"
: "${MODEL:=models/default}"                      # backbone folder or hub id
: "${TOKENIZER:=$MODEL}"
: "${TASK_DIR:=data/synthetic}"
: "${TASKS:=ALL_TASKS}"                           # targets: task names or a list from task_list.py
: "${SOURCE_TASKS:=$TASKS}"                       # leave-one-out: a target is never scored with its own module
: "${K:=16}"                                      # the targets' dev split
: "${DATA_SEED:=100}"
: "${SOURCE_CKPT_PATH:=runs/sources/${DELTA}}"    # tune.py output (scripts/${DELTA}.sh): one folder per task
: "${OUTPUT_DIR:=runs/tuneall/${DELTA}}"          # tune-all's modules ({target}/{source}); none yet: dev_after is -
: "${OUTPUT:=${OUTPUT_DIR}/dev_all.tsv}"          # the table: target, source, dev_zero_shot, dev_after
: "${MAX_OUTPUT_LENGTH:=16}"                      # keep equal to tuneall.sh's
: "${PREDICT_BATCH_SIZE:=100}"
: "${DEVICE:=auto}"
: "${GROUP_SIZE:=auto}"                          # modules per forward pass (auto: what fits); 1: one at a time
: "${PYTHON:=.venv/bin/python}"
: "${EXTRA_ARGS:=}"
# A rerun resumes: what is there with the same settings is kept and only the rest runs; OVERWRITE=1 redoes all.
if [[ "${OVERWRITE:-0}" == 1 ]]; then rerun=(--overwrite); else rerun=(--resume); fi

tuned=()
if [[ -d "$OUTPUT_DIR" ]]; then
    tuned=(--tuneall_ckpt_path "$OUTPUT_DIR")
fi
# JOBS=N or SLURM=1: one process per (target, source) pair, through sweep.py (see scripts/jobs.sh); each
# merges its row into $OUTPUT, which ends up as one process writes it.
source scripts/jobs.sh
entry=(-m get_similarity.dev_all)
if (( ${#LAUNCH[@]} )); then
    entry=(sweep.py "${LAUNCH[@]}" devall)
fi
# shellcheck disable=SC2206  # TASKS, SOURCE_TASKS and EXTRA_ARGS are word lists on purpose
cmd=("$PYTHON" "${entry[@]}" --quiet --tune_method "$DELTA"
     --model "$MODEL" --tokenizer_path "$TOKENIZER" --task_dir "$TASK_DIR"
     --tasks $TASKS --source_tasks $SOURCE_TASKS --k "$K" --data_seed "$DATA_SEED"
     --source_ckpt_path "$SOURCE_CKPT_PATH" "${tuned[@]}" --output "$OUTPUT"
     --max_output_length "$MAX_OUTPUT_LENGTH" --predict_batch_size "$PREDICT_BATCH_SIZE" --device "$DEVICE" --group_size "$GROUP_SIZE"
     "${rerun[@]}" $EXTRA_ARGS "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
