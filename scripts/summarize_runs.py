"""Print a task x method table of test scores from tune.py output folders, beside the trivial baseline.

    .venv/bin/python scripts/summarize_runs.py runs/demo/adapter runs/demo/lora runs/demo/prefix
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.errors import run_cli  # noqa: E402
from utils.io import write_text_atomic  # noqa: E402
from utils.params import HelpFormatter  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="tune.py --output_dir folders (a column each, named by the folder)")
    parser.add_argument("--task_dir", default="data/synthetic", help="the tasks' data (for the trivial baseline)")
    parser.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)  # before the heavy imports: --help answers at once
    from dataloader.crossfit import load_task
    from dataloader.metrics import metric_for_task, trivial_baseline
    from models.run_folders import read_result_tsv


    columns: dict[str, dict[str, tuple[float, float, int]]] = {}
    # a column is named by its folder, or by the whole path where two folders share a name (runs/*/lora)
    names = [Path(d).name for d in args.run_dirs]
    labels = {str(Path(d)): (Path(d).name if names.count(Path(d).name) == 1 else str(Path(d))) for d in args.run_dirs}
    for run_dir in map(Path, args.run_dirs):
        best: dict[str, tuple[float, float, int]] = {}
        rows = read_result_tsv(run_dir / "result.tsv")
        for row in rows:
            entry = (float(row["dev"]), float(row["test"]) if row["test"] != "-" else float("nan"), int(row["k"]))
            if row["task"] not in best or entry[0] > best[row["task"]][0]:  # best dev over the sweep
                best[row["task"]] = entry
        columns[labels[str(run_dir)]] = best
    tasks = list(dict.fromkeys(t for best in columns.values() for t in best))
    lines = ["| task | metric | trivial | " + " | ".join(columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for task in tasks:
        metric = metric_for_task(task, args.task_dir)
        k = next(best[task][2] for best in columns.values() if task in best)
        splits = load_task(args.task_dir, task, k, 100, ("train", "test"))
        baseline = trivial_baseline([ex.outputs[0] for ex in splits["train"]],
                                    [list(ex.outputs) for ex in splits["test"]], metric)
        cells = [f"{columns[c][task][1]:.3f}" if task in columns[c] else "" for c in columns]
        lines.append(f"| {task} | {metric} | {baseline:.3f} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_text_atomic(args.out, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
