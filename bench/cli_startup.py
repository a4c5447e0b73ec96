"""Start-up of the command lines: how long ``--help`` and a refused flag take, per entry point.

A user's first contact with a script is its help or a typo; both should answer before torch, transformers and
AdapterHub are imported (goal: at most 1.5 s on 2 cores). Each row is a fresh process, the median of --reps runs;
the import of torch alone is measured beside them as the floor of a script that does import it.

    .venv/bin/python bench/cli_startup.py            # 3 runs each
    .venv/bin/python bench/cli_startup.py --quick    # tune.py only, 1 run
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
    fmt,
    markdown_table,
    median,
    write_report,
)
from utils.errors import run_cli  # noqa: E402

GOAL_S = 1.5
ENTRY_POINTS = ["tune.py", "study.py", "sweep.py", "unit_model/unit_model_average.py",
                "unit_model/unit_model_others.py", "unit_model/unit_model_learned.py", "get_similarity/score.py",
                "get_similarity/tune_all.py", "get_similarity/dev_all.py", "get_similarity/importance.py",
                "scripts/export_peft.py", "scripts/convert_legacy_ckpt.py", "scripts/summarize_runs.py",
                "scripts/build_default_sources.py"]


def seconds(argv: list[str], expect: int) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=bench_env(), capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != expect:
        raise RuntimeError(f"{' '.join(argv[1:])}: exit code {proc.returncode}, expected {expect}: "
                           f"{proc.stderr.strip()[-200:]}")
    return took


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--reps", type=int, default=None, help="runs of each command (default 3; quick 1)")
    a = p.parse_args(argv)
    reps = a.reps or (1 if a.quick else 3)
    check_positive("--reps", [reps])
    scripts = ENTRY_POINTS[:1] if a.quick else ENTRY_POINTS
    rows = []
    floor = median([seconds([sys.executable, "-c", "import torch"], 0) for _ in range(reps)])
    for script in scripts:
        help_s = median([seconds([sys.executable, script, "--help"], 0) for _ in range(reps)])
        bad_s = median([seconds([sys.executable, script, "--no_such_flag"], 2) for _ in range(reps)])
        worst = max(help_s, bad_s)
        rows.append([script, fmt(help_s), fmt(bad_s), f"<= {GOAL_S}: {'yes' if worst <= GOAL_S else 'no'}"])
        print(f"{script}: --help {fmt(help_s)} s, a bad flag {fmt(bad_s)} s", flush=True)
    header = ["entry point", "--help s", "a refused flag s", "goal"]
    write_report(a.results_dir, "cli_startup", "Start-up of the command lines", command_line("bench/cli_startup.py",
                 argv), [markdown_table(header, rows)],
                 [f"median of {reps} fresh process(es) each; `python -c 'import torch'` alone takes {fmt(floor)} s",
                  "a refused flag exits with code 2 and one line"])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
