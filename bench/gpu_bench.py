"""GPU benchmark (run through bench/gpu.sh): training speed, similarity throughput and peak GPU memory at t5-base size.

The backbone is a randomly initialised T5 of t5-base's shape (d_model 768, d_ff 3072, 12+12 layers, 12 heads;
no hub download) with the embedded default's tokenizer, saved to a temp folder. For each delta method
(scripts' sizes: Houlsby adapter 12, LoRA r=8 alpha 16, prefix 32 with MLP 64) and each batch size:

* training: ``tune.main`` in this process with ``--device cuda --bf16`` on sent_review's 512-example
  training split, a 1-example dev split and validation only at the end; examples/s is tune.py's own logged
  rate per block of ``--steps / 6`` steps, first block dropped, median of the rest;
* peak GPU memory: ``torch.cuda.max_memory_allocated()`` over that run (reset before it);
* similarity: ``get_similarity.score`` in this process scoring ``--sources`` random modules with Loss on the
  64-example dev split of sent_review: sources/s from score.py's own per-source time, and its peak memory.

``--dry_run`` runs every code path on the CPU with the embedded default backbone and tiny sizes (checked by
tests/test_bench.py); its table goes to ``gpu_dry_run.md``.

    bash bench/gpu.sh              # on a GPU machine: table in $OUT/gpu.md (or bench/results/gpu.md)
    bash bench/gpu.sh --dry_run    # anywhere: seconds on a CPU
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    METHODS,
    SCRIPT_SIZES,
    bench_parser,
    check_positive,
    command_line,
    fmt,
    markdown_table,
    median,
    remove_tree,
    save_random_backbone,
    scratch_dir,
    script_config,
    write_report,
    write_sources,
)
from dataloader.synthetic import SUITE_DIR  # noqa: E402
from models.settings import DEFAULT_MODEL_DIR  # noqa: E402
from utils.errors import UserInputError, run_cli  # noqa: E402

TASK, SOURCE_TASK, K, DATA_SEED = "gpu_task", "sent_review", 512, 100
TARGET = "sent_review"
LOG_RATE = re.compile(r"step (\d+): loss \S+ lr \S+ ([0-9.]+) examples/s")
PER_SOURCE = re.compile(r"; ([0-9.]+) s per source per target")


def make_task_dir(root: Path) -> Path:
    lines = (SUITE_DIR / SOURCE_TASK / f"{SOURCE_TASK}_{K}_{DATA_SEED}_train.tsv").read_text(encoding="utf-8")
    (root / TASK).mkdir(parents=True)
    (root / TASK / f"{TASK}_{K}_{DATA_SEED}_train.tsv").write_text(lines, encoding="utf-8")
    (root / TASK / f"{TASK}_{K}_{DATA_SEED}_dev.tsv").write_text(lines.splitlines()[0] + "\n", encoding="utf-8")
    return root


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device: str) -> str:
    return fmt(torch.cuda.max_memory_allocated() / 2**20, 0) if device == "cuda" else "-"


def train_rate(model_dir: Path, method: str, bsz: int, steps: int, device: str, task_dir: Path,
               out: Path) -> float:
    from models.tune_flags import run_tune

    block = max(1, steps // 6)
    sizes = [x for k, v in SCRIPT_SIZES[method].items() for x in (f"--{k}", str(v))]
    argv = ["--do_train", "--tune_method", method, *sizes, "--model", str(model_dir), "--task_dir", str(task_dir),
            "--tasks", TASK, "--k", str(K), "--data_seed", str(DATA_SEED), "--output_dir", str(out),
            "--train_iters", str(block * 6), "--log_interval", str(block), "--valid_interval", str(block * 6),
            "--early_stop", "0", "--warmup_steps", "0", "--learning_rate_list", "1e-4", "--bsz_list", str(bsz),
            "--device", device, "--bf16", "--quiet", "--log_file_only"]
    with contextlib.redirect_stderr(io.StringIO()):
        code = run_tune(argv)
    if code != 0:
        raise RuntimeError(f"tune.py exited with {code}")
    log = next((out / TASK).glob(f"lr_0.0001_bsz_{bsz}_*/log.txt")).read_text(encoding="utf-8")
    rates = [float(m.group(2)) for m in LOG_RATE.finditer(log)]
    if len(rates) != 6:
        raise RuntimeError(f"expected 6 examples/s lines in {out}, found {len(rates)}")
    return median(rates[1:])


def grouped_rate(model_dir: Path, method: str, size: int, bsz: int, steps: int, device: str, task_dir: Path,
                 log_path: Path) -> float:
    """Training examples/s of ``size`` modules trained as one group (models/group.py: one Parallel forward pass
    per step on a shared batch), all modules counted; the median of blocks 2-6 of the trainer's own log."""
    from dataloader.crossfit import load_task
    from models.delta import DeltaConfig
    from models.settings import TrainConfig
    from models.trainer import Run, RunLog, TaskData, Trainer

    block = max(1, steps // 6)
    config = TrainConfig(model=str(model_dir), device=device, bf16=True, train_iters=block * 6, log_interval=block,
                         valid_interval=block * 6, early_stop=0, warmup_steps=0)
    trainer = Trainer(config, DeltaConfig(method, **SCRIPT_SIZES[method]))
    raw = load_task(task_dir, TASK, K, DATA_SEED, ["train", "dev"])
    task = TaskData(TASK, "ACC", {s: trainer.encode(raw[s]) for s in raw})
    logs = [RunLog(log_path if i == 0 else None, console=False) for i in range(size)]
    trainer.train_group([Run(task, 1e-4 * (1 + i), bsz, trainer.init_state, "random", None, log)
                         for i, log in enumerate(logs)])
    for log in logs:
        log.close()
    rates = [float(m.group(2)) for m in LOG_RATE.finditer(log_path.read_text(encoding="utf-8"))]
    if len(rates) != 6:
        raise RuntimeError(f"expected 6 examples/s lines in {log_path}, found {len(rates)}")
    return median(rates[1:]) * size  # the log counts one module's examples; the group trains `size` times that


def similarity_rate(model_dir: Path, method: str, n: int, device: str, scratch: Path) -> tuple[float, float]:
    """(sources per second in score.py's scoring loop, whole scoring run seconds)."""
    from transformers import T5Config

    from get_similarity.scoring import run_similarity
    from get_similarity.settings import SimilarityConfig, similarity_parser
    from utils.params import config_from

    root = scratch / f"sources-{method}"
    names = [f"src{i:03d}" for i in range(n)]
    write_sources(root, names, script_config(method), T5Config.from_pretrained(str(model_dir)),
                  backbone=model_dir.name)
    argv = ["--delta", method, "--metric", "Loss", "--tasks", TARGET, "--source_tasks", *names,
            "--source_ckpt_path", str(root), "--output_dir", str(scratch / f"similarity-{method}"),
            "--model", str(model_dir), "--task_dir", str(SUITE_DIR), "--k", "64", "--data_seed", "100",
            "--device", device, "--quiet"]
    stdout = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        run_similarity(config_from(SimilarityConfig, similarity_parser(None).parse_args(argv)))
        code = 0
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"score.py's scoring exited with {code}")
    match = PER_SOURCE.search(stdout.getvalue())
    if match is None:
        raise RuntimeError(f"score.py printed no per-source time: {stdout.getvalue()[-200:]}")
    remove_tree(root)
    return 1.0 / float(match.group(1)), seconds


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--dry_run", action="store_true", help="CPU, embedded default backbone, tiny sizes")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--bsz", type=int, nargs="+", default=None, help="training batch sizes (default 8 32; dry 4)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 300; dry 12)")
    p.add_argument("--sources", type=int, default=None, help="similarity sources per method (default 20; dry 2)")
    p.add_argument("--groups", type=int, nargs="+", default=None,
                   help="group sizes of the grouped-training rows (default 1 8 32; dry 1 2)")
    a = p.parse_args(argv)
    dry = a.dry_run or a.quick
    device = "cpu" if dry else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("bench/gpu.sh: CUDA is not available on this machine (use --dry_run to check the "
                             "code paths on a CPU)")
    bszs = a.bsz or ([4] if dry else [8, 32])
    steps = a.steps or (12 if dry else 300)
    n_sources = a.sources or (2 if dry else 20)
    groups = a.groups or ([1, 2] if dry else [1, 8, 32])
    check_positive("--bsz/--steps/--sources/--groups", [*bszs, steps, n_sources, *groups])

    start = time.perf_counter()
    scratch = scratch_dir("gpu")
    rows = []
    try:
        task_dir = make_task_dir(scratch / "data")
        if dry:
            model_dir, shape = DEFAULT_MODEL_DIR, "embedded default (dry run)"
        else:
            model_dir, shape = save_random_backbone(scratch / "t5-base", "t5-base", device="cuda"), "t5-base shape"
        for method in a.methods:
            for bsz in bszs:
                reset_peak(device)
                rate = train_rate(model_dir, method, bsz, steps, device, task_dir, scratch / f"tune-{method}-{bsz}")
                rows.append([method, f"train, batch {bsz}", fmt(rate, 1), "examples/s", peak_mb(device)])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
            reset_peak(device)
            per_s, seconds = similarity_rate(model_dir, method, n_sources, device, scratch)
            rows.append([method, f"similarity, {n_sources} sources (Loss, 64 dev examples)", fmt(per_s, 1),
                         f"sources/s ({fmt(seconds, 1)} s in all)", peak_mb(device)])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
        for size in groups:  # grouped training at the first batch size, LoRA (the study's default method)
            reset_peak(device)
            log = scratch / f"group-{size}.log"
            rate = grouped_rate(model_dir, "lora", size, bszs[0], steps, device, task_dir, log)
            rows.append(["lora", f"grouped train, G={size}, batch {bszs[0]} each", fmt(rate, 1),
                         "examples/s (all modules)", peak_mb(device)])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    finally:
        remove_tree(scratch)

    gpu = torch.cuda.get_device_name() if device == "cuda" else "none (CPU dry run)"
    write_report(a.results_dir, "gpu_dry_run" if dry else "gpu", f"GPU benchmark ({shape})",
                 command_line("bench/gpu.sh", argv, launcher="bash"),
                 [markdown_table(["method", "what", "rate", "unit", "peak GPU MB"], rows)],
                 [f"GPU: {gpu}; {steps} steps per training run, bf16 autocast (--bf16), lr 1e-4, 512 examples "
                  "of sent_review; rate: tune.py's logged examples/s, median of blocks 2-6",
                  "similarity: score.py's scoring loop only (its printed s per source), fp32; "
                  "peak GPU MB: torch.cuda.max_memory_allocated() over that run",
                  f"total bench time {time.perf_counter() - start:.0f} s"])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
