"""The whole study, from checked settings to its report: what ``study.py`` calls."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipeline.checks import check_inputs, inputs_digest, resolve_group_size
from pipeline.layout import StudyLayout
from pipeline.report import write_report
from pipeline.settings import resolve_plan
from pipeline.stages import DeltaRun, run_delta
from pipeline.steps import Progress, Steps
from utils.io import write_text_atomic
from utils.jobs import JobsFailed, LaunchOptions


def launch_options(p: argparse.Namespace) -> LaunchOptions | None:
    """How stages 1, 2, 3, 4 and 7 run as one process per job; None: every step in this process."""
    if p.jobs == 1 and not p.slurm:
        return None
    return LaunchOptions(jobs=p.jobs, slurm=p.slurm, slurm_partition=p.slurm_partition or None,
                         slurm_time=p.slurm_time, slurm_gpus=p.slurm_gpus, slurm_cpus=p.slurm_cpus or None,
                         slurm_mem=p.slurm_mem or None, slurm_array_parallelism=p.slurm_array_parallelism or None,
                         slurm_log_dir=p.slurm_log_dir or None).validate()


def run_study(p: argparse.Namespace) -> int:
    """Check everything, run every delta method's stages (resuming what is done), then write the report.
    Exit status 1 when a job of a launched stage failed (the launcher has said which, and where its log is)."""
    plan = resolve_plan(p)
    layout = StudyLayout(Path(p.output), p.source_library)
    check_inputs(plan, layout)
    launch = launch_options(p)
    group_size, why = resolve_group_size(plan)
    steps = Steps(layout, lambda stage: inputs_digest(plan, layout, stage),
                  Progress(len(plan.deltas) * len(plan.data_seeds)), launch)
    layout.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(layout.params, json.dumps(vars(p), indent=1))
    start = time.time()
    print(f"study: {len(plan.deltas)} delta method(s), {len(plan.task_pool)} source tasks, {len(plan.targets)} "
          f"targets, {len(plan.fusions)} fusion methods -> {layout.root}; {why}", flush=True)
    try:
        for delta in plan.deltas:
            run_delta(DeltaRun(plan, layout, steps, delta, group_size))
    except JobsFailed as e:  # the launcher has printed which jobs failed and where their logs are
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_report(plan, layout)
    print(f"study finished in {time.time() - start:.0f}s; summary: {layout.result_file('summary.md')}", flush=True)
    return 0
