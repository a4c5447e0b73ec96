"""Similarity scoring: N sources in one process (one backbone load) vs N processes of one source each.

The sources are random LoRA modules of the default size (r=8, alpha 16 on the embedded default backbone),
laid out like a tune.py output (``{root}/{source}/{run}/checkpoint`` + ``{root}/result.tsv``).
Each is scored with ``Loss`` on the dev split of one bundled target (sent_review; 16 examples at ``--k 16``,
64 at ``--k 64``) by ``python -m get_similarity.score``:

* one process: ``--source_tasks`` lists all N sources: one interpreter start, one backbone load;
* N processes: one ``score`` process per source, one after the other, each starting Python and loading the
  backbone (how the original scripts ran one source at a time).

Costs are CPU times (user + system) of whole child processes, start-up included (the machine is shared: CPU
time barely moves with other people's jobs; wall time is shown beside it). The one-process run is repeated
(median); the N single-source processes are split into as many chunks, interleaved with those repeats; one
untimed warm-up process runs first. Growth with N: the marginal CPU cost per source between the smallest
and the largest N, and the intercept (fixed cost); score.py's own "s per source per target" is shown too.
The N-process side runs for every N at the smallest dev size and only for the smallest N at the larger dev
sizes (each process costs about 4 s of start-up, whatever the dev size).

    OMP_NUM_THREADS=1 .venv/bin/python bench/similarity.py           # N = 10, 30; dev 16 and 64 examples
    OMP_NUM_THREADS=1 .venv/bin/python bench/similarity.py --quick   # N = 3, dev 16
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
METHOD, METRIC = "lora", "Loss"
PER_SOURCE = re.compile(r"; ([0-9.]+) s per source per target")


def score_once(root: Path, sources: list[str], k: int, out: Path) -> tuple[float, float, float]:
    """(wall s, CPU s) of one whole score.py process, and its own scoring (wall) seconds per source."""
    argv = [sys.executable, "-m", "get_similarity.score", "--delta", METHOD, "--metric", METRIC, "--tasks", TARGET,
            "--source_tasks", *sources, "--source_ckpt_path", str(root), "--output_dir", str(out),
            "--task_dir", str(SUITE_DIR), "--k", str(k), "--data_seed", "100", "--device", "cpu", "--quiet"]
    wall, cpu, stdout = run_child(argv, f"score.py with {len(sources)} source(s)")
    rows = (out / "result.tsv").read_text(encoding="utf-8").splitlines()[1:]
    if len(rows) != len(sources):
        raise RuntimeError(f"{out / 'result.tsv'}: expected {len(sources)} rows, found {len(rows)}")
    remove_tree(out)
    match = PER_SOURCE.search(stdout)
    if match is None:
        raise RuntimeError(f"score.py printed no per-source time: {stdout.strip()[-200:]}")
    return wall, cpu, float(match.group(1))


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--n", type=int, nargs="+", default=None, help="source counts (default 10 30; quick 3)")
    p.add_argument("--k", type=int, nargs="+", default=None,
                   help="few-shot splits whose dev sets are scored: 16 and 64 examples (default 16 64; quick 16)")
    p.add_argument("--reps", type=int, default=None, help="repeats of the one-process run (default 3; quick 1)")
    a = p.parse_args(argv)
    ns = sorted(a.n or ([3] if a.quick else [10, 30]))
    ks = sorted(a.k or ([16] if a.quick else [16, 64]))
    reps = a.reps or (1 if a.quick else 3)
    check_positive("--n/--k/--reps", [*ns, *ks, reps])

    scratch = scratch_dir("similarity")
    rows, growth = [], []
    try:
        names = [f"src{i:03d}" for i in range(max(ns))]
        write_sources(scratch / "sources", names, script_config(METHOD), default_config())
        score_once(scratch / "sources", names[:1], ks[0], scratch / "out")  # warm-up: file cache, .pyc files
        for k in ks:
            fit: dict[int, float] = {}
            for n in ns:
                sources = names[:n]
                separate_wanted = k == ks[0] or n == ns[0]
                one: list[tuple[float, float]] = []
                per_source: list[float] = []
                separate = [0.0, 0.0]  # wall, CPU
                parts = [sources[i::reps] if separate_wanted else [] for i in range(reps)]
                for rep in range(reps):
                    wall, cpu, each = score_once(scratch / "sources", sources, k, scratch / "out")
                    one.append((wall, cpu))
                    per_source.append(each)
                    for s in parts[rep]:
                        s_wall, s_cpu, _ = score_once(scratch / "sources", [s], k, scratch / "out")
                        separate[0] += s_wall
                        separate[1] += s_cpu
                one_wall, one_cpu = median([w for w, _ in one]), median([c for _, c in one])
                fit[n] = one_cpu
                if separate_wanted:
                    cells = [fmt(separate[1]), f"{separate[1] / one_cpu:.1f}x", f"{separate[0] / one_wall:.1f}x",
                             fmt(separate[1] / n)]
                else:
                    cells = ["not run", "-", "-", "-"]
                rows.append([k, n, fmt(one_cpu), *cells, f"{median(per_source):.3f}"])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
            if len(ns) > 1:
                lo, hi = fit[ns[0]], fit[ns[-1]]
                marginal = (hi - lo) / (ns[-1] - ns[0])
                growth.append([k, f"{marginal:.3f}", fmt(lo - ns[0] * marginal),
                               f"{hi / lo:.2f}x for {ns[-1] / ns[0]:.0f}x the sources"])
    finally:
        remove_tree(scratch)

    header = ["dev examples", "N sources", "one process CPU s", "N processes CPU s", "ratio (CPU)", "ratio (wall)",
              "CPU s per process", "scoring s/source (score.py)"]
    tables = [markdown_table(header, rows)]
    if growth:
        tables.append(markdown_table(["dev examples", "marginal CPU s/source (one process)",
                                      "fixed CPU s (one process)", "one-process CPU growth"], growth))
    write_report(a.results_dir, "similarity", "Similarity scoring: one process vs one process per source",
                 command_line("bench/similarity.py", argv), tables,
                 [f"{METHOD} modules (r=8, alpha 16) on the embedded default, metric {METRIC}, target {TARGET}, CPU",
                  f"one process: median of {reps} run(s); N processes: the sum of N runs, interleaved with those; "
                  "CPU s = user + system time of the whole child (start-up included), the figure the ratio uses; "
                  "the wall-time ratio is shown beside it",
                  "scoring s/source: score.py's own wall time per source of its scoring loop (median over the "
                  "one-process runs)",
                  "marginal = (CPU at the largest N - CPU at the smallest N) / the difference in N; fixed = the "
                  "intercept (start-up, imports, backbone load, data, writing result.tsv)"])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
