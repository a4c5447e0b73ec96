"""Grouped stages (models/group.py): G modules per forward pass against one module at a time.

Two stages, each a whole child process run at G = 1 (one at a time, the old behaviour) and at larger G,
all in this one bench run:

* tune-all: the 19 sources of one target (sent_review) tuned for 40 steps at batch 8, lr 3e-3, as the
  study's tune-all stage does (``python -m get_similarity.tune_all --group_size G``);
* similarity: the same 19 sources scored on the target's dev split (64 examples) with all five metrics
  (``python -m get_similarity.score --metric all --group_size G``), the KL reference being a 20th module.

* sweep: ``tune.py`` over several tasks (one run each, 40 steps at batch 8) at ``--group_size 1``, ``auto``
  and G = the number of tasks, on tasks of similar input lengths (four sentiment tasks of the suite) and of
  mixed lengths (eight real CrossFit tasks where ``../shared/data/crossfit-real`` exists, else four suite
  tasks of four families). Different tasks share no batch, so a group runs under ``BatchSplit``; ``auto``
  on the CPU trains them one at a time (models/tuning.py, ``sweep_groups``), and this shows why.

The sources are random LoRA modules of the default size (r=8, alpha 16) on the embedded default backbone.
Costs are CPU times (user + system) of the whole child, start-up included: with ``OMP_NUM_THREADS=1`` a
one-thread process, whose CPU time barely moves with other load on the machine (wall time is beside it).
The stage's own time, as the script prints it, is shown too, without the ~10 s of imports and loading.
Runs are interleaved over G (G = 1 first, then the others; with --reps > 1 the order alternates) and the
median is taken.

    OMP_NUM_THREADS=1 .venv/bin/python bench/grouped.py           # G = 1 4 8 19
    OMP_NUM_THREADS=1 .venv/bin/python bench/grouped.py --quick   # 3 sources, a few steps, G = 1 3
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    bench_parser,
    check_positive,
    command_line,
    default_config,
    fmt,
    markdown_table,
    median,
    remove_tree,
    run_child,
    scratch_dir,
    script_config,
    write_report,
    write_sources,
)
from dataloader.synthetic import SUITE_DIR  # noqa: E402
from utils.errors import run_cli  # noqa: E402

TARGET = "sent_review"
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "crossfit-real"
SIMILAR_TASKS = ["sent_review", "sent_tweet", "sent_satisfied", "sent_stars"]
MIXED_SUITE_TASKS = ["sent_review", "qa_story", "ext_animals", "nli_entail"]
MIXED_REAL_TASKS = ["ag_news", "ai2_arc", "ade_corpus_v2-classification", "boolq", "emo", "glue-rte",
                    "squad-no_context", "tweet_eval-irony"]
TUNE_ALL_TIME = re.compile(r"tuned \d+ pair\(s\) in ([0-9.]+)s")
SCORE_TIME = re.compile(r"; ([0-9.]+) s per source per target")
GOALS = {"tune-all": 4.0, "similarity": 3.0}  # the goals: at least this many times less CPU at the largest G


def tune_all_once(sources: Path, names: list[str], out: Path, steps: int, size: int) -> tuple[float, float, float]:
    argv = [sys.executable, "-m", "get_similarity.tune_all", "--tasks", TARGET, "--source_tasks", *names,
            "--source_ckpt_path", str(sources), "--output_dir", str(out), "--steps", str(steps), "--bsz", "8",
            "--learning_rate", "3e-3", "--task_dir", str(SUITE_DIR), "--group_size", str(size), "--device", "cpu",
            "--quiet", "--log_file_only"]
    wall, cpu, stdout = run_child(argv, f"tune-all with --group_size {size}")
    match = TUNE_ALL_TIME.search(stdout)
    if match is None:
        raise RuntimeError(f"tune-all printed no time: {stdout.strip()[-200:]}")
    remove_tree(out)
    return wall, cpu, float(match.group(1))


# The metrics the grouped forward pass serves, as measured when grouping was built (the estimators added since, LEEP
# and LogME, ride on the same passes; Arrow and GradAlign run none per source).
SCORED = ["Loss", "KL", "EL2N", "LogitsCos", "GraNd"]


def score_once(sources: Path, names: list[str], out: Path, examples: int, size: int) -> tuple[float, float, float]:
    argv = [sys.executable, "-m", "get_similarity.score", "--delta", "lora", "--metric", *SCORED, "--tasks", TARGET,
            "--source_tasks", *names, "--source_ckpt_path", str(sources), "--random_tuned_ckpt_path", str(sources),
            "--max_examples", str(examples), "--output_dir", str(out), "--task_dir", str(SUITE_DIR),
            "--group_size", str(size), "--device", "cpu", "--quiet"]
    wall, cpu, stdout = run_child(argv, f"score.py with --group_size {size}")
    match = SCORE_TIME.search(stdout)
    if match is None:
        raise RuntimeError(f"score.py printed no time: {stdout.strip()[-200:]}")
    rows = (out / "result.tsv").read_text(encoding="utf-8").splitlines()[1:]
    if len(rows) != len(SCORED) * len(names):
        raise RuntimeError(f"{out / 'result.tsv'}: expected {len(SCORED) * len(names)} rows, found {len(rows)}")
    remove_tree(out)
    return wall, cpu, float(match.group(1)) * len(names)


def sweep_once(tasks: list[str], task_dir: Path, k: int, data_seed: int, out: Path, steps: int,
               size: str) -> tuple[float, float]:
    argv = [sys.executable, "tune.py", "--do_train", "--tune_method", "lora", "--lora_r", "8", "--tasks", *tasks,
            "--task_dir", str(task_dir), "--k", str(k), "--data_seed", str(data_seed), "--output_dir", str(out),
            "--train_iters", str(steps), "--valid_interval", str(steps), "--bsz_list", "8",
            "--learning_rate_list", "3e-3", "--group_size", size, "--device", "cpu", "--quiet", "--log_file_only",
            "--max_output_length", "16"]
    wall, cpu, _ = run_child(argv, f"tune.py with --group_size {size}")
    remove_tree(out)
    return wall, cpu


def sweep_rows(steps: int, quick: bool) -> list[list]:
    """tune.py over tasks of similar and of mixed input lengths, at G = 1, auto and the number of tasks."""
    cases = [("similar lengths (suite)", SIMILAR_TASKS[:2] if quick else SIMILAR_TASKS, SUITE_DIR, 16, 100)]
    real = [t for t in MIXED_REAL_TASKS if (REAL_DATA / t).is_dir()]
    if quick:
        pass  # the code path only: one case, two tasks
    elif len(real) == len(MIXED_REAL_TASKS):
        cases.append(("mixed lengths (real CrossFit)", real, REAL_DATA, 16, 100))
    else:
        cases.append(("mixed lengths (suite)", MIXED_SUITE_TASKS, SUITE_DIR, 16, 100))
    rows = []
    scratch = scratch_dir("grouped-sweep")
    try:
        for name, tasks, task_dir, k, seed in cases:
            sizes = ("1", "auto") if quick else ("1", "auto", str(len(tasks)))
            measured = {size: sweep_once(tasks, task_dir, k, seed, scratch / "out", steps, size) for size in sizes}
            base = measured["1"][1]
            for size, (wall, cpu) in measured.items():
                rows.append([name, len(tasks), size, fmt(cpu), fmt(wall), f"{base / cpu:.2f}x"])
    finally:
        remove_tree(scratch)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="group sizes (default 1 4 8 19; quick 1 3)")
    p.add_argument("--sources", type=int, default=None, help="sources of the target (default 19; quick 3)")
    p.add_argument("--steps", type=int, default=None, help="tune-all steps (default 40, the demo's; quick 2)")
    p.add_argument("--examples", type=int, default=None, help="dev examples scored (default 64; quick 8)")
    p.add_argument("--reps", type=int, default=None, help="runs of each (stage, G) (default 1; quick 1)")
    a = p.parse_args(argv)
    n = a.sources or (3 if a.quick else 19)
    sizes = sorted(set(a.sizes or ([1, 3] if a.quick else [1, 4, 8, 19])))
    steps, examples, reps = a.steps or (2 if a.quick else 40), a.examples or (8 if a.quick else 64), a.reps or 1
    check_positive("--sizes/--sources/--steps/--examples/--reps", [*sizes, n, steps, examples, reps])
    if sizes[0] != 1:
        sizes = [1, *sizes]  # the ratios are against one module at a time

    scratch = scratch_dir("grouped")
    times: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    try:
        names = [f"src{i:03d}" for i in range(n)]
        write_sources(scratch / "sources", [*names, TARGET], script_config("lora"), default_config())
        if not a.quick:  # warm-up: file cache, .pyc files
            tune_all_once(scratch / "sources", names[:1], scratch / "out", 1, 1)
        for rep in range(reps):
            for size in (sizes if rep % 2 == 0 else sizes[::-1]):
                times.setdefault(("tune-all", size), []).append(
                    tune_all_once(scratch / "sources", names, scratch / "out", steps, size))
                times.setdefault(("similarity", size), []).append(
                    score_once(scratch / "sources", names, scratch / "out", examples, size))
                print(f"G={size}: tune-all {fmt(times[('tune-all', size)][-1][1])} CPU s, similarity "
                      f"{fmt(times[('similarity', size)][-1][1])} CPU s", flush=True)
    finally:
        remove_tree(scratch)

    rows = []
    for stage in ("tune-all", "similarity"):
        base_cpu = median([c for _, c, _ in times[(stage, 1)]])
        base_own = median([o for _, _, o in times[(stage, 1)]])
        for size in sizes:
            wall = median([w for w, _, _ in times[(stage, size)]])
            cpu = median([c for _, c, _ in times[(stage, size)]])
            own = median([o for _, _, o in times[(stage, size)]])
            goal = "-" if size == 1 else f">= {GOALS[stage]:.0f}x: {'yes' if base_cpu / cpu >= GOALS[stage] else 'no'}"
            rows.append([stage, size, fmt(cpu), fmt(wall), f"{base_cpu / cpu:.2f}x", fmt(own),
                         f"{base_own / own:.2f}x", goal])
    header = ["stage", "G", "CPU s (process)", "wall s", "CPU ratio vs G=1", "stage's own s", "own ratio vs G=1",
              "goal (process CPU)"]
    sweep_header = ["tune.py sweep", "tasks", "--group_size", "CPU s (process)", "wall s", "CPU ratio vs 1"]
    sweep = sweep_rows(steps, a.quick)
    write_report(a.results_dir, "grouped", "Grouped stages: G modules per forward pass vs one at a time",
                 command_line("bench/grouped.py", argv),
                 [markdown_table(header, rows), markdown_table(sweep_header, sweep)],
                 [f"{n} random LoRA sources (r=8, alpha 16) of target {TARGET} on the embedded default backbone, CPU",
                  f"tune-all: {steps} steps at batch 8 per source; similarity: Loss, KL, EL2N, LogitsCos and GraNd "
                  f"on {examples} dev examples",
                  "CPU s = user + system time of the whole child (start-up included), median of "
                  f"{reps} run(s); stage's own s = the time the script prints for its loop (tune-all: all pairs; "
                  "similarity: per source x sources)",
                  "sweep: one tune.py process per row, one run per task; auto must never cost more than 1"])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
