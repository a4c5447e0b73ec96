"""Scale a sweep out: one process per job, N at once on this machine or one Slurm job array.

Takes the command line of an entry point and splits it into independent jobs that write where the single
process would have written:

* ``tune``: tune.py, one job per (task, learning rate, batch size); every job updates the shared
  ``{output_dir}/result.tsv`` under a file lock;
* ``tuneall``: get_similarity/tune_all.py, one job per (target, source) pair (each writes its own module);
* ``devall``: get_similarity/dev_all.py, one job per (target, source) pair, each merging its row into
  ``--output`` under a file lock.

A job trains one module (tune.py) or one pair (tune-all): on its own, as ``--group_size 1`` does in one
process. With dropout on, a module trained in a group of several (models/group.py) gets other dropout masks,
so compare a scaled-out sweep with a single process run at ``--group_size 1``.

Launch flags come before the entry point's name, its own flags after it. Once every job has succeeded (and
was waited for), the shared table is put in the order one process writes, so the outputs are the same
files. Exit code: 0 when every job succeeded, 1 when some failed (the summary names them and their logs),
2 for bad input (checked before anything starts).

    python sweep.py --jobs 4 tune --do_train --do_predict --tune_method lora --tasks ALL_TASKS \\
        --learning_rate_list 1e-3 3e-3 --output_dir runs/lora
    python sweep.py --slurm --slurm_partition gpu --slurm_gpus 1 tuneall --tasks SAMPLE_TASKS \\
        --source_tasks ALL_TASKS --source_ckpt_path runs/sources/lora --output_dir runs/tuneall/lora
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.launch import order_result_tsv, script_job
from utils.errors import run_cli
from utils.jobs import Job, add_launch_args, options_from_args, run_jobs
from utils.params import HelpFormatter


@dataclass
class Plan:
    jobs: list[Job]
    log_dir: Path  # default home of the per-job logs: beside the outputs
    finish: Callable[[], None] | None = None  # once every job succeeded: put shared tables in order


def plan_tune(argv: list[str]) -> Plan:
    from models.tune_flags import config_from_args, tune_parser
    from models.tuning import check_inputs

    config = config_from_args(tune_parser(None).parse_args(argv))
    # The checks tune.py makes before writing anything, made once here rather than failing in every job.
    inputs = check_inputs(config)
    out = inputs.output_dir
    folders = inputs.output_folders()
    if not config.do_train:
        jobs = [script_job(f"{t}/{f.name}", "tune.py", [*argv, "--tasks", t]) for t, f in zip(inputs.tasks, folders)]
        keys = [(t, f.name) for t, f in zip(inputs.tasks, folders)]
    else:
        # The last --tasks/--learning_rate_list/--bsz_list on a command line wins: each job keeps one of each.
        jobs = [script_job(f"{t}/{f.name}", "tune.py",
                           [*argv, "--tasks", t, "--learning_rate_list", repr(lr), "--bsz_list", bsz])
                for (t, lr, bsz), f in zip(inputs.runs, folders)]
        keys = [(t, f.name) for (t, _, _), f in zip(inputs.runs, folders)]
    return Plan(jobs, out / "logs", lambda: order_result_tsv(out, keys))


def pairs_of(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    """Parsed flags and (target, source) pairs of tune_all.py or dev_all.py; every source module checked."""
    from models.tune_all import load_sources, resolve_pairs

    args = parser.parse_args(argv)
    _, _, sources, pairs = resolve_pairs(args)
    load_sources(args.source_ckpt_path, sources, args.tune_method)
    return args, pairs


def plan_tuneall(argv: list[str]) -> Plan:
    from models.pair_settings import tune_all_parser

    args, pairs = pairs_of(tune_all_parser(None), argv)
    jobs = [script_job(f"{t}/{s}", "get_similarity/tune_all.py", [*argv, "--tasks", t, "--source_tasks", s])
            for t, s in pairs]
    return Plan(jobs, Path(args.output_dir) / "logs")


def plan_devall(argv: list[str]) -> Plan:
    from models import dev_all
    from models.pair_settings import dev_all_parser

    args, pairs = pairs_of(dev_all_parser(None), argv)
    every_pair, output = pairs, Path(args.output)
    if output.is_file():
        dev_all.read_rows(output)  # a malformed table is refused now, not by every job
        if args.resume and not args.overwrite:
            pairs = dev_all.unfinished_pairs(output, pairs, args.tuneall_ckpt_path)
        elif not args.overwrite:
            dev_all.check_no_earlier_rows(output, pairs, merge=True)
    jobs = [script_job(f"{t}/{s}", "get_similarity/dev_all.py",
                       [*argv, "--tasks", t, "--source_tasks", s, "--merge"]) for t, s in pairs]
    return Plan(jobs, output.parent / "logs", lambda: dev_all.keep_pairs(output, every_pair))


PLANS = {"tune": plan_tune, "tuneall": plan_tuneall, "devall": plan_devall}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_launch_args(p)
    p.add_argument("entry", choices=sorted(PLANS), help="tune (tune.py), tuneall (tune_all.py) or devall (dev_all.py)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the entry point's own flags")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    entry_argv = args.args[1:] if args.args[:1] == ["--"] else args.args
    plan = PLANS[args.entry](entry_argv)
    log_dir = Path(args.log_dir) if args.log_dir else plan.log_dir
    report = run_jobs(plan.jobs, options, log_dir, name=f"{args.entry}")
    if report.submitted is not None:
        return 0
    if report.failed:
        return 1
    if plan.finish is not None:
        plan.finish()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
