#!/usr/bin/env bash
# Zero-shot similarity of source modules to target tasks (get_similarity/score.py).
# The thin scripts {adapter,lora,prefix}_{Loss,KL,EL2N,LogitsCos,GraNd}.sh set DELTA and METRIC and exec this.
# Every variable below can be overridden from the environment, e.g.
#   TASKS=SAMPLE_TASKS GRANULARITY=layer MAX_EXAMPLES=8 bash scripts/get_similarity/lora_Loss.sh
# DRY_RUN=1 prints the command instead of running it. Relative paths are relative to the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${DELTA:?set DELTA to adapter, lora or prefix (or use one of the thin scripts)}"
: "${METRIC:?set METRIC to one or several of Loss KL EL2N LogitsCos GraNd, or all}"
: "${MODEL:=models/default}"                      # backbone folder or hub id
: "${TOKENIZER:=$MODEL}"
: "${TASK_DIR:=data/synthetic}"
: "${K:=16}"
: "${DATA_SEED:=100}"
: "${SPLIT:=dev}"
: "${SOURCE_CKPT_PATH:=runs/sources/${DELTA}}"    # tune.py output (scripts/${DELTA}.sh): one folder per task
: "${RANDOM_TUNED_CKPT_PATH:=runs/random/${DELTA}}"  # KL only: tune.py on the targets' K-shot train split
# The tasks of a folder of modules, in the order they were first written: its result.tsv (tune.py), its
# sources.tsv (a module library), else its subfolders.
tasks_in() {
    local table
    for table in "$1/result.tsv" "$1/sources.tsv"; do  # both have the task in their first column
        if [[ -f "$table" ]]; then
            awk -F'\t' 'NR > 1 && !seen[$1]++ { printf "%s ", $1 }' "$table"
            return 0
        fi
    done
    if [[ -d "$1" ]]; then
        for d in "$1"/*/; do [[ -d "$d" ]] && printf '%s ' "$(basename "$d")"; done
    fi
    return 0
}
# targets: task names or a list from task_list.py; default: the targets the baseline trained (RANDOM_TUNED_CKPT_PATH)
: "${TASKS:=$(tasks_in "$RANDOM_TUNED_CKPT_PATH")}"
: "${TASKS:=ALL_TASKS}"
# sources (leave-one-out: a target is never its own source); default: the modules of SOURCE_CKPT_PATH
: "${SOURCE_TASKS:=$(tasks_in "$SOURCE_CKPT_PATH")}"
: "${SOURCE_TASKS:=$TASKS}"
: "${GRANULARITY:=model}"                         # model, block or layer
: "${MAX_EXAMPLES:=}"                             # empty: the whole split
: "${BATCH_SIZE:=32}"
: "${OUTPUT_DIR:=runs/similarity/${DELTA}}"        # result.tsv there: this run adds its rows (OVERWRITE=1: replaces them)
: "${DEVICE:=auto}"
: "${GROUP_SIZE:=auto}"                          # modules per forward pass (auto: what fits); 1: one at a time
: "${PYTHON:=.venv/bin/python}"
: "${EXTRA_ARGS:=}"
# A rerun resumes: what is there with the same settings is kept and only the rest runs; OVERWRITE=1 redoes all.
if [[ "${OVERWRITE:-0}" == 1 ]]; then rerun=(--overwrite); else rerun=(--resume); fi

# shellcheck disable=SC2206  # METRIC, TASKS, SOURCE_TASKS and EXTRA_ARGS are word lists on purpose
cmd=("$PYTHON" -m get_similarity.score --quiet --delta "$DELTA" --metric $METRIC
     --model "$MODEL" --tokenizer_path "$TOKENIZER" --task_dir "$TASK_DIR"
     --tasks $TASKS --source_tasks $SOURCE_TASKS --k "$K" --data_seed "$DATA_SEED" --split "$SPLIT"
     --source_ckpt_path "$SOURCE_CKPT_PATH" --random_tuned_ckpt_path "$RANDOM_TUNED_CKPT_PATH"
     --granularity "$GRANULARITY" --batch_size "$BATCH_SIZE" --output_dir "$OUTPUT_DIR" --device "$DEVICE" --group_size "$GROUP_SIZE"
     ${MAX_EXAMPLES:+--max_examples "$MAX_EXAMPLES"} "${rerun[@]}" $EXTRA_ARGS "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
