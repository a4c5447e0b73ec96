"""Peak memory of the similarity stage as the number of sources grows (one backbone load, fresh process each).

The study's similarity stage (study.py stage 5) is one ``get_similarity.score`` process that scores every
source against the targets with every metric. Here it runs on N random source modules of the default size
(scripts' sizes on the embedded default backbone, tune.py-like layout), one bundled target (sent_review,
16-example dev split) and the four token metrics Loss, KL, EL2N and LogitsCos (KL's reference module is a
random module too; GraNd, one backward pass per example, is left out for time: its buffers do not depend on
N), in a fresh child per N through bench/peak_rss.py. Reported: the child's peak RSS after its imports (the
peak mark is reset once torch, transformers, adapters and get_similarity.score are imported; that RSS is the
baseline), the peak minus that baseline, and the CPU time of the run. Goal: peak at the largest N <= 1.2 x
peak at the smallest N.

    OMP_NUM_THREADS=1 .venv/bin/python bench/load_sources.py           # N = 10, 30, 100; lora and prefix
    OMP_NUM_THREADS=1 .venv/bin/python bench/load_sources.py --quick   # N = 3, 6; lora; Loss only
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    METHODS,
    bench_parser,
    check_positive,
    command_line,
    default_config,
    delta_shapes,
    fmt,
    markdown_table,
    module_mb,
    remove_tree,
    run_peak_rss,
    scratch_dir,
    script_config,
    write_report,
    write_sources,
)
from dataloader.synthetic import SUITE_DIR  # noqa: E402
from utils.errors import run_cli  # noqa: E402

TARGET = "sent_review"
PRELOAD = ["torch", "transformers", "adapters", "get_similarity.score"]
GOAL = 1.2


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--n", type=int, nargs="+", default=None, help="source counts (default 10 30 100; quick 3 6)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS, help="default lora prefix (quick: lora)")
    p.add_argument("--metrics", nargs="+", default=None,
                   help="similarity metrics (default: Loss KL EL2N LogitsCos; quick: Loss; 'all' adds GraNd)")
    a = p.parse_args(argv)
    ns = sorted(a.n or ([3, 6] if a.quick else [10, 30, 100]))
    methods = a.methods or (["lora"] if a.quick else ["lora", "prefix"])
    metrics = a.metrics or (["Loss"] if a.quick else ["Loss", "KL", "EL2N", "LogitsCos"])
    check_positive("--n", ns)

    config = default_config()
    scratch = scratch_dir("load-sources")
    rows, verdicts = [], []
    try:
        names = [f"src{i:03d}" for i in range(max(ns))]
        for method in methods:
            cfg = script_config(method)
            write_sources(scratch / method / "sources", names, cfg, config)
            write_sources(scratch / method / "random", [TARGET], cfg, config, seed=1)  # KL's reference module
            mb = module_mb(delta_shapes(config, cfg))
            peaks = {}
            for n in ns:
                out = scratch / "out"
                args = ["--delta", method, "--metric", *metrics, "--tasks", TARGET, "--source_tasks", *names[:n],
                        "--source_ckpt_path", str(scratch / method / "sources"), "--random_tuned_ckpt_path",
                        str(scratch / method / "random"), "--output_dir", str(out), "--task_dir", str(SUITE_DIR),
                        "--k", "16", "--data_seed", "100", "--max_examples", "64", "--device", "cpu", "--quiet"]
                r = run_peak_rss("get_similarity.score", args, PRELOAD, scratch, f"{method} similarity of {n}")
                lines = (out / "result.tsv").read_text(encoding="utf-8").splitlines()
                if len(lines) < 1 + n:
                    raise RuntimeError(f"{out / 'result.tsv'}: expected at least {n} rows, found {len(lines) - 1}")
                remove_tree(out)
                peaks[n] = r["peak_mb"]
                rows.append([method, n, fmt(mb * n, 1), fmt(r["baseline_mb"], 0), fmt(r["peak_mb"], 0),
                             fmt(r["peak_mb"] - r["baseline_mb"], 0), fmt(r["cpu_seconds"], 1)])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
            ratio = peaks[ns[-1]] / peaks[ns[0]]
            verdicts.append([method, f"{ratio:.3f}", "yes" if ratio <= GOAL else "no"])
    finally:
        remove_tree(scratch)

    header = ["method", "N sources", "N x module MB", "baseline MB", "peak MB", "peak - baseline MB", "run CPU s"]
    write_report(a.results_dir, "load_sources", "Similarity stage: peak RSS against the number of sources",
                 command_line("bench/load_sources.py", argv),
                 [markdown_table(header, rows),
                  markdown_table(["method", f"peak at N={ns[-1]} / peak at N={ns[0]}", f"<= {GOAL}"], verdicts)],
                 [f"metrics: {' '.join(metrics)}; target {TARGET} (16 dev examples); modules of the scripts' sizes "
                  "on the embedded default; one fresh child per N",
                  "baseline: RSS after importing torch, transformers, adapters and get_similarity.score; peak: the "
                  "highest RSS from then to the end (VmHWM after a reset at the baseline)"])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
