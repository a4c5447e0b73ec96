#!/usr/bin/env bash
# Tune-all (get_similarity/tune_all.py): every source module tuned on every target, leave-one-out, for the
# Euclidean fusion method. The thin scripts {adapter,lora,prefix}_tuneall.sh set DELTA (and LR) and exec this.
# Every variable below can be overridden from the environment, e.g.
#   TASKS=SAMPLE_TASKS STEPS=100 bash scripts/lora_tuneall.sh
# A rerun skips the pairs already tuned (OVERWRITE=1 redoes them). JOBS=4 tunes 4 pairs at once;
# SLURM=1 (+ SLURM_PARTITION, SLURM_GPUS, ...) submits one Slurm job array (scripts/jobs.sh lists the
# variables). DRY_RUN=1 prints the command instead of running it. Relative paths are relative to the
# repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${DELTA:?set DELTA to adapter, lora or prefix (or use one of the thin scripts)}"
: "${MODEL:=models/default}"                      # backbone folder or hub id
: "${TOKENIZER:=$MODEL}"
: "${TASK_DIR:=data/synthetic}"
: "${TASKS:=ALL_TASKS}"                           # targets: task names or a list from task_list.py
: "${SOURCE_TASKS:=$TASKS}"                       # leave-one-out: a target is never tuned from itself
: "${K:=16}"                                      # the targets' few-shot split
: "${DATA_SEED:=100}"
: "${SOURCE_CKPT_PATH:=runs/sources/${DELTA}}"    # tune.py output (scripts/${DELTA}.sh): one folder per task
: "${OUTPUT_DIR:=runs/tuneall/${DELTA}}"          # modules go to ${OUTPUT_DIR}/{target}/{source}
: "${STEPS:=200}"
: "${LR:=5e-4}"
: "${BSZ:=8}"
: "${WARMUP_STEPS:=}"  # empty: a tenth of STEPS (the rule of tune.py and the study)
: "${SEED:=42}"
: "${MAX_OUTPUT_LENGTH:=16}"                      # as scripts/tune.sh: the suite's answers are short
: "${PREDICT_BATCH_SIZE:=100}"
: "${DEVICE:=auto}"
: "${GROUP_SIZE:=auto}"                          # modules per forward pass (auto: what fits); 1: one at a time
: "${PYTHON:=.venv/bin/python}"
: "${EXTRA_ARGS:=}"
# A rerun resumes: what is there with the same settings is kept and only the rest runs; OVERWRITE=1 redoes all.
rerun=(); [[ "${OVERWRITE:-0}" == 1 ]] && rerun=(--overwrite)

# JOBS=N or SLURM=1: one process per (target, source) pair, through sweep.py (see scripts/jobs.sh).
source scripts/jobs.sh
entry=(-m get_similarity.tune_all)
if (( ${#LAUNCH[@]} )); then
    entry=(sweep.py "${LAUNCH[@]}" tuneall)
fi
# shellcheck disable=SC2206  # TASKS, SOURCE_TASKS and EXTRA_ARGS are word lists on purpose
cmd=("$PYTHON" "${entry[@]}" --quiet --tune_method "$DELTA"
     --model "$MODEL" --tokenizer_path "$TOKENIZER" --task_dir "$TASK_DIR"
     --tasks $TASKS --source_tasks $SOURCE_TASKS --k "$K" --data_seed "$DATA_SEED"
     --source_ckpt_path "$SOURCE_CKPT_PATH" --output_dir "$OUTPUT_DIR"
     --steps "$STEPS" --learning_rate "$LR" --bsz "$BSZ" --seed "$SEED"
     --max_output_length "$MAX_OUTPUT_LENGTH" --predict_batch_size "$PREDICT_BATCH_SIZE" --device "$DEVICE" --group_size "$GROUP_SIZE"
     "${rerun[@]}" $EXTRA_ARGS "$@")
[[ -n "$WARMUP_STEPS" ]] && cmd+=(--warmup_steps "$WARMUP_STEPS")
if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
