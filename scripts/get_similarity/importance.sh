#!/usr/bin/env bash
# Group importance of one module on one task (get_similarity/importance.py): reset each block, then each
# layer, to its initial value and re-score. {adapter,lora,prefix}_block.sh set DELTA and exec this.
# Every variable below can be overridden from the environment, e.g.
#   TASK=topic_news bash scripts/get_similarity/lora_block.sh
# DRY_RUN=1 prints the command instead of running it. Relative paths are relative to the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${DELTA:?set DELTA to adapter, lora or prefix (or use one of the *_block.sh scripts)}"
: "${MODEL:=models/default}"
: "${TOKENIZER:=$MODEL}"
: "${TASK_DIR:=data/synthetic}"
: "${TASK:=sent_review}"
: "${K:=16}"
: "${DATA_SEED:=100}"
: "${SPLIT:=dev}"
: "${CHECKPOINT:=runs/sources/${DELTA}/${TASK}}"  # checkpoint, tune.py run folder or task folder (best run)
: "${MAX_EXAMPLES:=}"                             # empty: the whole split
: "${BATCH_SIZE:=32}"
: "${MAX_OUTPUT_LENGTH:=16}"
: "${OUTPUT_DIR:=runs/importance/${DELTA}/${TASK}}"
: "${DEVICE:=auto}"
: "${PYTHON:=.venv/bin/python}"
: "${EXTRA_ARGS:=}"

# shellcheck disable=SC2206  # EXTRA_ARGS is a word list on purpose
cmd=("$PYTHON" -m get_similarity.importance --quiet --checkpoint "$CHECKPOINT" --task "$TASK"
     --model "$MODEL" --tokenizer_path "$TOKENIZER" --task_dir "$TASK_DIR" --k "$K" --data_seed "$DATA_SEED"
     --split "$SPLIT" --batch_size "$BATCH_SIZE" --max_output_length "$MAX_OUTPUT_LENGTH"
     --output_dir "$OUTPUT_DIR" --device "$DEVICE" ${MAX_EXAMPLES:+--max_examples "$MAX_EXAMPLES"} $EXTRA_ARGS "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
