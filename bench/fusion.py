"""Time and peak memory of fusing N source modules with unit_model's `average` method, at t5-base sizes.

Sources are random delta modules of a t5-base-shaped backbone (d_model 768, 12+12 layers; the vocabulary of
the embedded default) with the sizes of scripts/{adapter,lora,prefix}.sh (Houlsby adapter 12, LoRA r=8
alpha 16, prefix 32 with MLP 64), saved in a tune.py-like layout. Each fusion runs the real CLI
(``python -m unit_model.unit_model_average``: leave-one-out over ``--tasks``, one target, so N sources)
in a fresh child through bench/peak_rss.py: the baseline is the child's RSS after importing torch,
unit_model.fusion, matplotlib and seaborn (the peak mark is reset there); ``peak - baseline`` is what the
fusion itself added (reading and checking every checkpoint, the streamed weighted sum, the fused checkpoint,
weights.tsv and the heatmap). LoRA is fused both ways: ``delta_w`` (the default: sums B·A per pair, one
out x in float64 matrix per pair, then SVD) and ``params`` (averages the factors).

"read CPU s/module" is the CPU time to read one checkpoint with models.delta.load_delta_checkpoint and touch
its values once, measured in this process right after each fusion (files in the page cache, as they are for
the fusion; the CLI checks a source from its header and reads it once to add it in, and LoRA delta_w reads
each pair's factors again in a second pass, so one read per module (two for delta_w) is the I/O floor that
the marginal cost per module is compared with). "CPU s/module" is the CLI's CPU time (imports
excluded) divided by N; its wall time is shown too (CPU time hardly moves with the load of a shared machine).

    OMP_NUM_THREADS=1 .venv/bin/python bench/fusion.py           # N = 10, 30, 100 (writes ~2.5 GB to a temp dir)
    OMP_NUM_THREADS=1 .venv/bin/python bench/fusion.py --quick   # N = 3 modules of the default size
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    METHODS,
    bench_parser,
    check_positive,
    command_line,
    default_config,
    default_tokenizer,
    delta_shapes,
    fmt,
    markdown_table,
    median,
    module_mb,
    remove_tree,
    run_peak_rss,
    scratch_dir,
    script_config,
    t5_config,
    write_report,
    write_sources,
)
from models.delta import WEIGHTS_FILE  # noqa: E402
from models.formats import load_delta_checkpoint  # noqa: E402
from models.run_folders import resolve_checkpoint  # noqa: E402
from utils.errors import run_cli  # noqa: E402

TARGET = "fusiontarget"
PRELOAD = ["torch", "unit_model.fusion", "matplotlib", "matplotlib.pyplot", "seaborn"]


def fuse_child(root: Path, method: str, combine: str, names: list[str], out: Path, scratch: Path) -> dict:
    args = ["--delta", method, "--tasks", TARGET, *names, "--targets", TARGET, "--source_ckpt_path", str(root),
            "--save_ckpt_path", str(out), "--lora_combine", combine]
    result = run_peak_rss("unit_model.unit_model_average", args, PRELOAD, scratch, f"{method} fusion of {len(names)}")
    if not (out / f"without_{TARGET}" / WEIGHTS_FILE).is_file():
        raise RuntimeError(f"{out}: no fused checkpoint written")
    remove_tree(out)
    return result


def read_seconds(root: Path, names: list[str]) -> float:
    """CPU seconds per module to read each checkpoint once and touch every value (files in the page cache).

    safetensors maps the file, so loading alone reads almost nothing; the pages are read when the values are
    first used, hence one pass (a sum) over every tensor.
    """
    folders = [resolve_checkpoint(root / n, n) for n in names]
    start = time.process_time()
    for folder in folders:
        for tensor in load_delta_checkpoint(folder)[0].values():
            tensor.sum()
    return (time.process_time() - start) / len(folders)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--n", type=int, nargs="+", default=None, help="source counts (default 10 30 100; quick 3)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--reps", type=int, default=None, help="repeats per point, median (default 1)")
    a = p.parse_args(argv)
    ns = sorted(a.n or ([3] if a.quick else [10, 30, 100]))
    reps = a.reps or 1
    check_positive("--n/--reps", [*ns, reps])
    config = default_config() if a.quick else t5_config("t5-base", len(default_tokenizer()))
    shape_name = "default" if a.quick else "t5-base"

    scratch = scratch_dir("fusion")
    rows, slopes = [], []
    try:
        names = [f"src{i:03d}" for i in range(max(ns))]
        for method in a.methods:
            cfg = script_config(method)
            root = scratch / method
            write_sources(root, names, cfg, config, backbone=shape_name)
            mb = module_mb(delta_shapes(config, cfg))
            file_mb = (resolve_checkpoint(root / names[0]) / WEIGHTS_FILE).stat().st_size / 2**20
            for combine in (["delta_w", "params"] if method == "lora" else ["params"]):
                label = f"lora ({combine})" if method == "lora" else method
                cpu_at: dict[int, float] = {}
                read_at: dict[int, float] = {}
                for n in ns:
                    runs, reads = [], []
                    for _ in range(reps):
                        runs.append(fuse_child(root, method, combine, names[:n], scratch / "out", scratch))
                        reads.append(read_seconds(root, names[:n]))
                    cpu = median([r["cpu_seconds"] for r in runs])
                    extra = median([r["peak_mb"] - r["baseline_mb"] for r in runs])
                    rows.append([label, n, fmt(file_mb), fmt(cpu), f"{cpu / n:.3f}", f"{median(reads):.4f}",
                                 fmt(median([r["seconds"] for r in runs])), fmt(extra, 0), f"{extra / mb:.1f}",
                                 fmt(median([r["baseline_mb"] for r in runs]), 0)])
                    cpu_at[n], read_at[n] = cpu, median(reads)
                    print(" | ".join(str(c) for c in rows[-1]), flush=True)
                if len(ns) > 1:
                    lo, hi = ns[-2], ns[-1]
                    reads_per_module = 2 if combine == "delta_w" else 1
                    slope = (cpu_at[hi] - cpu_at[lo]) / (hi - lo)
                    floor = reads_per_module * median([read_at[lo], read_at[hi]])
                    slopes.append([label, f"{lo} -> {hi}", f"{slope:.4f}", f"{reads_per_module}: {floor:.4f}",
                                   f"{slope / floor:.1f}x",
                                   fmt(cpu_at[hi] - hi * slope)])
            remove_tree(root)
    finally:
        remove_tree(scratch)

    header = ["method", "N", "MB/module (file)", "fusion CPU s", "CPU s/module", "read CPU s/module", "fusion wall s",
              "peak - baseline MB", "in modules", "baseline MB"]
    tables = [markdown_table(header, rows)]
    if slopes:
        tables.append(markdown_table(["method", "N", "marginal CPU s/module", "I/O floor s/module (reads: s)",
                                      "marginal / floor", "fixed CPU s"], slopes))
    write_report(a.results_dir, "fusion", f"Fusing N modules of a {shape_name}-shaped backbone (average, one target)",
                 command_line("bench/fusion.py", argv), tables,
                 [f"fusion CPU s / wall s: the CLI's run in the child, imports excluded, median of {reps}; read CPU "
                  "s/module: one load_delta_checkpoint per module plus one pass over its values (safetensors maps "
                  "the file; pages are read when touched), files in the page cache",
                  "marginal = (CPU at the largest N - CPU at the next N) / their difference; the CLI checks each "
                  "source's header, then reads it once (LoRA delta_w: twice), the I/O floor; fixed = the intercept",
                  "baseline: the child's RSS after the preloaded imports; peak: its peak RSS (VmHWM, reset at the "
                  "baseline) at the end",
                  "in modules = (peak - baseline) / the module's float32 size",
                  "LoRA delta_w holds one out x in float64 matrix at a time (unit_model/fusion.py); its peak RSS is "
                  "mostly glibc's heap keeping freed SVD workspaces (see bench/README.md)"])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
