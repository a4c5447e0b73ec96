"""A library of a thousand modules: the cost of each retrieval stage and its peak memory at N = 10, 100 and 1,000.

Three measurements, one report (``bench/results/library_scale.md``):

1. **Retrieval and fusion, end to end, on the embedded default backbone.** N random LoRA modules (the scripts'
   sizes) on disk; ``get_similarity.score --metric Loss --prefilter Arrow --prefilter_top 20`` on one bundled
   target (sent_review, its 16-shot dev split), then ``unit_model_others.py`` fuses the 20 it retrieved by their
   Loss. Each runs in a fresh child (bench/peak_rss.py): wall and CPU seconds, and peak RSS above the imports.
   Goals: retrieval plus fusion at N = 1,000 within 5 minutes; peak at N = 1,000 at most 1.2x the peak at N = 10.
2. **Cost per source, at equal dev examples.** In one process, on the same target and examples: zero-shot Loss
   (forward passes over the dev split) against Arrow and GradAlign (no forward pass per source; their per-target
   probe is timed apart), on the default backbone and on a randomly initialised T5 of t5-base's shape. Goal: a
   cheap estimator at least 100x cheaper per source than Loss.
3. **The parameter-space stage alone at t5-base shape**, N = 10, 100, 1,000 modules streamed (each generated,
   scored and dropped; a probe of the right shapes stands in for the target's): seconds and peak RSS per N, in a
   fresh child each. The growth exponent b of seconds ~ a·N^b is fitted on each stage's times (least squares in
   log-log); 1 is linear.

    .venv/bin/python bench/library_scale.py           # the full run, PyTorch's default threads (the goal is on 2 cores)
    .venv/bin/python bench/library_scale.py --quick   # N = 10, 30; no t5-base; measurement 3 in-process
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    bench_parser,
    check_positive,
    command_line,
    default_config,
    default_tokenizer,
    fmt,
    markdown_table,
    median,
    remove_tree,
    run_peak_rss,
    save_random_backbone,
    scratch_dir,
    script_config,
    t5_config,
    write_report,
    write_sources,
)
from dataloader.synthetic import SUITE_DIR  # noqa: E402
from utils.errors import run_cli  # noqa: E402

TARGET = "sent_review"
TOP = 20
GROUP = 10  # sources per forward pass of the expensive stage, the same at every N (its memory grows with it)
PRELOAD = ["torch", "transformers", "adapters", "get_similarity.scoring", "unit_model.fusion"]
TIME_GOAL_S, MEMORY_GOAL, COST_GOAL = 300.0, 1.2, 100.0


def growth_exponent(ns: list[int], seconds: list[float]) -> float:
    """b of seconds ≈ a·N^b, by least squares on (log N, log seconds)."""
    import numpy as np

    return float(np.polyfit(np.log(ns), np.log(seconds), 1)[0])


# --- 1. retrieval and fusion on the default backbone -------------------------------------------------------


def retrieval_and_fusion(scratch: Path, n: int, names: list[str]) -> dict:
    """One two-stage retrieval over the first n modules, then the fusion of its top TOP, each in a fresh child."""
    sources, out, fused = scratch / "sources", scratch / f"sim{n}", scratch / f"fused{n}"
    score_args = ["--delta", "lora", "--metric", "Loss", "--prefilter", "Arrow", "--prefilter_top", str(TOP),
                  "--tasks", TARGET, "--source_tasks", *names[:n], "--source_ckpt_path", str(sources),
                  "--output_dir", str(out), "--task_dir", str(SUITE_DIR), "--k", "16", "--data_seed", "100",
                  "--max_examples", "64", "--device", "cpu", "--quiet", "--group_size", str(GROUP)]
    retrieval = run_peak_rss("get_similarity.score", score_args, PRELOAD, scratch, f"retrieval over {n}")
    fuse_args = ["--delta", "lora", "--tasks", TARGET, *names[:n], "--targets", TARGET,
                 "--source_ckpt_path", str(sources), "--result_tsv", str(out / "result.tsv"), "--metric", "Loss",
                 "--save_ckpt_path", str(fused), "--task_dir", str(SUITE_DIR), "--device", "cpu"]
    fusion = run_peak_rss("unit_model.unit_model_others", fuse_args, PRELOAD, scratch, f"fusion of {TOP} of {n}")
    weights = (fused / "weights.tsv").read_text(encoding="utf-8").splitlines()[1:]
    merged = {line.split("\t")[1] for line in weights}
    if len(merged) != min(TOP, n):
        raise RuntimeError(f"the fusion merged {len(merged)} sources, expected the {min(TOP, n)} retrieved")
    remove_tree(out)
    remove_tree(fused)
    return {"retrieval": retrieval, "fusion": fusion}


# --- 2. cost per source -------------------------------------------------------------------------------------


def per_source_costs(model_dir: str | None, repeats: int) -> dict[str, float]:
    """Seconds per source of Loss, Arrow and GradAlign on TARGET's dev split, and of the two probes (per target)."""
    import torch

    from dataloader.crossfit import load_task
    from get_similarity.metrics import METRICS
    from get_similarity.scoring import SimilarityScorer, TargetContext
    from models.backbone import load_backbone
    from models.delta import attach_delta, delta_state_dict
    from models.examples import encode_examples

    model, tokenizer = load_backbone(model_dir, None, torch.device("cpu")) if model_dir else load_backbone(
        str(Path(__file__).resolve().parents[1] / "models" / "default"), None, torch.device("cpu"))
    cfg = script_config("lora")
    torch.manual_seed(42)
    attach_delta(model, cfg)
    model.eval()
    init = delta_state_dict(model)
    examples = load_task(SUITE_DIR, TARGET, 16, 100, ["dev"])["dev"]
    task = encode_examples(tokenizer, examples, 256, 16)
    scorer = SimilarityScorer(model, tokenizer.pad_token_id, init, "model", 32, cfg)
    gen = torch.Generator().manual_seed(0)
    source = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in init.items()}
    out: dict[str, float] = {"examples": len(examples)}
    for probe, metric in (("inputs", "Arrow"), ("gradient", "GradAlign")):
        start = time.perf_counter()
        probes = scorer.probes(task, [METRICS[metric]])
        out[f"{probe} probe"] = time.perf_counter() - start
        context = TargetContext(True, probes)
        scorer.parameter_scores(METRICS[metric], source, context)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            scorer.parameter_scores(METRICS[metric], source, context)
            times.append(time.perf_counter() - start)
        out[metric] = median(times)
    context = TargetContext(True, {})
    scorer.score(task, source, [METRICS["Loss"]], context=context)  # warm-up
    times = []
    for _ in range(max(3, repeats // 20)):
        start = time.perf_counter()
        scorer.score(task, source, [METRICS["Loss"]], context=context)
        times.append(time.perf_counter() - start)
    out["Loss"] = median(times)
    return out


# --- 3. the parameter-space stage alone, streamed --------------------------------------------------------


def stream_parameter_stage(n: int, shape: str, out: str) -> None:
    """Score n generated LoRA modules of ``shape`` with Arrow and GradAlign, one module alive at a time (run in a
    child: its peak RSS is the measurement); the loop's own seconds go to the JSON file ``out``."""
    import torch

    from bench.common import delta_shapes
    from get_similarity.estimators import Probe, Update, arrow_alignment, gradient_alignment

    config = default_config() if shape == "default" else t5_config(shape, len(default_tokenizer()))
    cfg = script_config("lora")
    shapes = delta_shapes(config, cfg)
    spec, scale = cfg.spec, cfg.spec.scaling(cfg.sizes())
    pairs = spec.factor_pairs(list(shapes))
    gen = torch.Generator().manual_seed(1)
    moments, gradient = {}, {}
    for name, (a, b) in pairs.items():  # a probe of the right shapes (a unit-trace second moment, a gradient)
        d_in, d_out = shapes[a][1], shapes[b][0]
        h = torch.randn(64, d_in, generator=gen)
        moments[name] = (h.T @ h / h.norm(dim=1).pow(2).sum()).float()
        gradient[name] = torch.randn(d_out, d_in, generator=gen) * 1e-3
    moments, gradient = Probe(moments), Probe(gradient)
    start, generating = time.perf_counter(), 0.0
    for _ in range(n):
        made = time.perf_counter()
        tensors = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
        generating += time.perf_counter() - made
        updates = {name: Update(a=tensors[a], b=tensors[b], scale=scale) for name, (a, b) in pairs.items()}
        arrow_alignment(moments, updates)
        gradient_alignment(gradient, updates)
        del tensors, updates
    Path(out).write_text(json.dumps({"seconds": time.perf_counter() - start - generating}), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--n", type=int, nargs="+", default=None, help="library sizes (default 10 100 1000; quick 10 30)")
    p.add_argument("--stream", nargs=3, metavar=("N", "SHAPE", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.stream:  # the child of measurement 3
        stream_parameter_stage(int(a.stream[0]), a.stream[1], a.stream[2])
        return 0
    ns = sorted(a.n or ([10, 30] if a.quick else [10, 100, 1000]))
    check_positive("--n", ns)
    scratch = scratch_dir("library-scale")
    tables, notes = [], []
    try:
        # 1. retrieval and fusion
        names = [f"src{i:04d}" for i in range(ns[-1])]
        write_sources(scratch / "sources", names, script_config("lora"), default_config())
        rows, measured = [], {}
        for n in ns:
            r = retrieval_and_fusion(scratch, n, names)
            measured[n] = r
            total = r["retrieval"]["seconds"] + r["fusion"]["seconds"]
            rows.append([n, fmt(r["retrieval"]["seconds"], 1), fmt(r["fusion"]["seconds"], 1), fmt(total, 1),
                         fmt(r["retrieval"]["peak_mb"] - r["retrieval"]["baseline_mb"], 0),
                         fmt(r["fusion"]["peak_mb"] - r["fusion"]["baseline_mb"], 0),
                         fmt(r["retrieval"]["peak_mb"], 0), fmt(r["fusion"]["peak_mb"], 0)])
            print(" | ".join(map(str, rows[-1])), flush=True)
        tables.append(markdown_table(["N modules", "retrieval s", f"fusion of top {TOP} s", "total s",
                                      "retrieval peak - imports MB", "fusion peak - imports MB",
                                      "retrieval peak MB", "fusion peak MB"], rows))
        first, last = measured[ns[0]], measured[ns[-1]]
        memory = {stage: last[stage]["peak_mb"] / first[stage]["peak_mb"] for stage in ("retrieval", "fusion")}
        exponent = growth_exponent(ns, [measured[n]["retrieval"]["seconds"] for n in ns])
        total_last = last["retrieval"]["seconds"] + last["fusion"]["seconds"]
        tables.append(markdown_table(
            ["goal", "measured", "met"],
            [[f"retrieval + fusion at N={ns[-1]} <= {TIME_GOAL_S:.0f} s", fmt(total_last, 1),
              "yes" if total_last <= TIME_GOAL_S else "no"],
             *[[f"{stage} peak at N={ns[-1]} / at N={ns[0]} <= {MEMORY_GOAL}", f"{memory[stage]:.3f}",
                "yes" if memory[stage] <= MEMORY_GOAL else "no"] for stage in memory],
             ["retrieval seconds ~ N^b (default backbone, whole command)", f"b = {exponent:.2f}", "-"]]))
        # 2. cost per source
        backbones = [("default", None)]
        if not a.quick:
            backbones.append(("t5-base shape", str(save_random_backbone(scratch / "t5-base", "t5-base"))))
        cost_rows = []
        for label, model_dir in backbones:
            c = per_source_costs(model_dir, repeats=10 if a.quick else 50)
            cost_rows.append([label, int(c["examples"]), fmt(c["Loss"] * 1e3, 2), fmt(c["Arrow"] * 1e3, 3),
                              fmt(c["GradAlign"] * 1e3, 3), fmt(c["Loss"] / c["Arrow"], 0),
                              fmt(c["Loss"] / c["GradAlign"], 0), fmt(c["inputs probe"], 2),
                              fmt(c["gradient probe"], 2)])
            print(" | ".join(map(str, cost_rows[-1])), flush=True)
        tables.append(markdown_table(["backbone", "dev examples", "Loss ms/source", "Arrow ms/source",
                                      "GradAlign ms/source", "Loss / Arrow", "Loss / GradAlign",
                                      "Arrow probe s/target", "GradAlign probe s/target"], cost_rows))
        # 3. the parameter-space stage alone at t5-base shape
        shape = "default" if a.quick else "t5-base"
        stream_rows, seconds, stream_peaks = [], [], []
        for n in ns:
            timing = scratch / f"stream{n}.json"
            peak, added = "-", "-"
            if a.quick:  # in this process, for seconds: no peak without a fresh child
                stream_parameter_stage(n, shape, str(timing))
            else:
                r = run_peak_rss("bench.library_scale", ["--stream", str(n), shape, str(timing)],
                                 ["torch", "get_similarity.estimators"], scratch, f"parameter-space stage over {n}")
                peak, added = fmt(r["peak_mb"], 0), fmt(r["peak_mb"] - r["baseline_mb"], 0)
                stream_peaks.append(r["peak_mb"])
            loop = json.loads(timing.read_text(encoding="utf-8"))["seconds"]
            seconds.append(loop)
            stream_rows.append([n, fmt(loop, 2), fmt(loop / n * 1e3, 3), peak, added])
            print(" | ".join(map(str, stream_rows[-1])), flush=True)
        stream_exponent = growth_exponent(ns, seconds)
        tables.append(markdown_table([f"N modules ({shape} shape)", "Arrow + GradAlign s (generation excluded)",
                                      "ms per module",
                                      "peak MB", "peak - imports MB"], stream_rows))
        peaks = (f"; peak at N={ns[-1]} / at N={ns[0]} = {stream_peaks[-1] / stream_peaks[0]:.3f}"
                 if stream_peaks else "")
        notes.append(f"parameter-space stage at {shape} shape: seconds ~ N^b with b = {stream_exponent:.2f}{peaks}"
                     + (" (--quick: in this process, so no peak)" if a.quick else ""))
    finally:
        remove_tree(scratch)
    notes += [f"target {TARGET}, 16-shot dev split of data seed 100; LoRA r=8 on q, v (the scripts' sizes); random "
              "modules N(0, 0.02); retrieval = Arrow over all N, then Loss over the top 20; the fusion merges "
              "those 20 by their Loss (unit_model_others.py, softmax at the default temperature)",
              "peak: VmHWM after a reset once torch, transformers, adapters and the stage's modules are imported "
              "(bench/peak_rss.py); seconds: the stage's own wall time in its child, imports excluded",
              "t5-base shape: a randomly initialised T5 of t5-base's sizes with the default tokenizer's vocabulary; "
              "in measurement 3 a probe of the right shapes stands in for the target's (the per-source cost does "
              "not depend on its values)"]
    write_report(a.results_dir, "library_scale", "A library of N modules: two-stage retrieval, cost and memory",
                 command_line("bench/library_scale.py", argv), tables, notes)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
