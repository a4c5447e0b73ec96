"""Intra-op threads on a shared machine: one study stage alone and beside a busy neighbour, at 1 thread and at
PyTorch's default (one per core), all in this one bench run.

The stage is tune-all of random LoRA sources of one target on the embedded default (``python -m
get_similarity.tune_all``), the study's most expensive stage. The neighbour is the same command in a second
process started at the same moment: another study job on the same cores. Four cases, each a fresh process:

* alone, default threads (``OMP_NUM_THREADS`` unset: PyTorch starts one thread per core);
* alone, ``OMP_NUM_THREADS=1``;
* beside a neighbour, both at the default (twice as many threads as cores);
* beside a neighbour, both at 1 thread.

What a fair share costs is about 2x the time alone; much more than that beside a neighbour at the default is the
threads spinning for cores they do not get. Wall time of the measured process is what a person waits for.

    .venv/bin/python bench/threads.py           # 10 sources, 20 steps
    .venv/bin/python bench/threads.py --quick   # 2 sources, 2 steps
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    REPO,
    bench_env,
    bench_parser,
    check_positive,
    command_line,
    default_config,
    fmt,
    markdown_table,
    remove_tree,
    scratch_dir,
    script_config,
    write_report,
    write_sources,
)
from dataloader.synthetic import SUITE_DIR  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.threads import usable_cores  # noqa: E402

TARGET = "sent_review"


def tune_all_argv(sources: Path, names: list[str], out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "get_similarity.tune_all", "--tasks", TARGET, "--source_tasks", *names,
            "--source_ckpt_path", str(sources), "--output_dir", str(out), "--steps", str(steps), "--bsz", "8",
            "--learning_rate", "3e-3", "--task_dir", str(SUITE_DIR), "--group_size", "auto", "--device", "cpu",
            "--quiet", "--log_file_only"]


def run_case(sources: Path, names: list[str], scratch: Path, steps: int, threads: str | None,
             neighbour: bool) -> float:
    """Wall seconds of the measured process (the neighbour, if any, starts with it and runs to its end)."""
    env = bench_env()
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    procs = []
    start = time.perf_counter()
    for i in range(2 if neighbour else 1):
        procs.append(subprocess.Popen(tune_all_argv(sources, names, scratch / f"out{i}", steps), cwd=REPO, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    walls = []
    for proc in procs:
        _, err = proc.communicate()
        walls.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise RuntimeError(f"tune-all failed with exit code {proc.returncode}: {err.strip()[-300:]}")
    for i in range(len(procs)):
        remove_tree(scratch / f"out{i}")
    return walls[0]


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--sources", type=int, default=None, help="sources of the target (default 10; quick 2)")
    p.add_argument("--steps", type=int, default=None, help="tune-all steps (default 20; quick 2)")
    a = p.parse_args(argv)
    n, steps = a.sources or (2 if a.quick else 10), a.steps or (2 if a.quick else 20)
    check_positive("--sources/--steps", [n, steps])
    cores = usable_cores()
    scratch = scratch_dir("threads")
    rows = []
    try:
        names = [f"src{i:03d}" for i in range(n)]
        write_sources(scratch / "sources", [*names, TARGET], script_config("lora"), default_config())
        alone = {}
        for neighbour in (False, True):
            for threads in (None, "1"):
                wall = run_case(scratch / "sources", names, scratch, steps, threads, neighbour)
                label = "default (one per core)" if threads is None else "1"
                if not neighbour:
                    alone[threads] = wall
                rows.append(["beside a neighbour" if neighbour else "alone", label, fmt(wall),
                             f"{wall / alone[threads]:.2f}x"])
                print(f"{rows[-1][0]}, threads {label}: {fmt(wall)} s", flush=True)
    finally:
        remove_tree(scratch)
    header = ["tune-all process", "threads", "wall s", "vs alone at the same threads"]
    write_report(a.results_dir, "threads", "Intra-op threads alone and beside a busy neighbour",
                 command_line("bench/threads.py", argv), [markdown_table(header, rows)],
                 [f"{cores} cores this process may use (os.sched_getaffinity); tune-all of {n} random LoRA sources of "
                  f"{TARGET}, {steps} steps at batch 8, --group_size auto",
                  "the neighbour is the same command started at the same moment; a fair share is about 2x"])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
