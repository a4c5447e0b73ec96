#!/usr/bin/env bash
# The transfer study in one command (study.py): sources -> similarities -> fused initialisations -> results.
# Every study.py parameter can be set from the environment under its upper-case name, e.g.
#   DELTAS="adapter lora prefix" TARGETS=ALL_TASKS OUTPUT=runs/study-full bash scripts/pipeline.sh
# Size knobs: TASKS (source pool), TARGETS, DELTAS, FUSIONS, SOURCE_ITERS, TARGET_BUDGETS, TARGET_K, MAX_EXAMPLES;
# TARGET_DATA_SEEDS="13 42 100" replicates the target side on each few-shot split;
# TRANSFERABILITY=1 adds the single-source pairs stage and its report (tune-all and dev-all with it).
# Scale-out: JOBS=N runs the sources, random, tune-all, dev-all and transfer stages as N processes at once;
# GROUP_SIZE=G trains or scores G modules per forward pass in every stage (auto by default; 1: one at a time).
# SLURM=1 submits each of them as one Slurm job array and waits for it, with SLURM_PARTITION, SLURM_TIME,
# SLURM_GPUS, SLURM_CPUS, SLURM_MEM (GB), SLURM_ARRAY_PARALLELISM and SLURM_LOG_DIR (read only with SLURM=1:
# Slurm itself sets some of these names inside a job). The other stages run in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PYTHON:=.venv/bin/python}"
args=()
for name in OUTPUT MODEL TASK_DIR TASKS TARGETS DELTAS FUSIONS SEED SOURCE_LIBRARY \
            SOURCE_K SOURCE_DATA_SEED SOURCE_ITERS SOURCE_LR SOURCE_BSZ SOURCE_VALID_INTERVAL SOURCE_EARLY_STOP \
            TARGET_K TARGET_DATA_SEEDS TARGET_BUDGETS TARGET_LR TARGET_BSZ TARGET_VALID_INTERVAL TARGET_WARMUP \
            TARGET_EARLY_STOP MAX_INPUT_LENGTH MAX_OUTPUT_LENGTH \
            ADAPTER_SIZE LORA_R LORA_ALPHA LORA_TARGETS PREFIX_LENGTH PREFIX_MLP PREFIX_ITERS_SCALE \
            IA3_LR_SCALE TEM WEIGHT_NORM COS_TEM LORA_COMBINE LAM DENSITY MAJORITY_SIGN MERGE_SEED TOP_K \
            LEARNED_BUDGET LEARNED_OPTIMIZER MAX_EXAMPLES PREFILTER PREFILTER_TOP TRANSFERABILITY DEVICE BF16 JOBS \
            GROUP_SIZE; do
    if [ -n "${!name:-}" ]; then
        args+=("--${name,,}" "${!name}")
    fi
done
if [[ "${SLURM:-0}" == 1 ]]; then
    args+=(--slurm 1)
    for name in SLURM_PARTITION SLURM_TIME SLURM_GPUS SLURM_CPUS SLURM_MEM SLURM_ARRAY_PARALLELISM SLURM_LOG_DIR; do
        if [ -n "${!name:-}" ]; then
            args+=("--${name,,}" "${!name}")
        fi
    done
fi
exec "$PYTHON" study.py "${args[@]}" "$@"
