#!/usr/bin/env bash
# Sourced by tune.sh, tuneall.sh and devall.sh: turns the scale-out variables into sweep.py's launch flags.
#   JOBS=N                      N local processes at once, one per job (a tune.py run, a tune-all or dev-all pair)
#   SLURM=1                     one Slurm job array through submitit instead, waited for; its settings:
#   SLURM_PARTITION, SLURM_TIME (minutes or D-HH:MM:SS), SLURM_GPUS, SLURM_CPUS, SLURM_MEM (GB),
#   SLURM_ARRAY_PARALLELISM, SLURM_LOG_DIR, SLURM_NO_WAIT=1 (print the array's id and return)
#   JOB_LOG_DIR                 per-job logs (default: a logs/ folder beside the outputs)
# LAUNCH is left empty when neither JOBS (other than 1) nor SLURM=1 is set: the entry point runs as before.
# The SLURM_* settings are read only with SLURM=1 (Slurm itself sets some of these names inside a job).
LAUNCH=()
if [[ "${SLURM:-0}" == 1 ]]; then
    LAUNCH+=(--slurm)
    for setting in PARTITION TIME GPUS CPUS MEM ARRAY_PARALLELISM LOG_DIR; do
        var="SLURM_${setting}"
        if [[ -n "${!var:-}" ]]; then
            LAUNCH+=("--slurm_${setting,,}" "${!var}")
        fi
    done
    if [[ "${SLURM_NO_WAIT:-0}" == 1 ]]; then
        LAUNCH+=(--no_wait)
    fi
fi
if [[ -n "${JOBS:-}" && "${JOBS}" != 1 ]]; then
    LAUNCH+=(--jobs "$JOBS")
fi
if (( ${#LAUNCH[@]} )) && [[ -n "${JOB_LOG_DIR:-}" ]]; then
    LAUNCH+=(--log_dir "$JOB_LOG_DIR")
fi
