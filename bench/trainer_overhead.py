"""Training speed of tune.py's loop against a minimal hand-written loop, per delta method and backbone size.

Both loops train the same ``adapters`` model (models.delta.attach_delta on the same backbone, the sizes of
scripts/{adapter,lora,prefix}.sh) on the same batches (models.examples.training_batches with the same seed)
with AdamW. The hand-written loop does forward, backward, optimizer step and zero_grad, nothing else.

What is timed in tune.py: ``tune.main`` runs in this process with a 1-example dev split, validation only at
the end (``--valid_interval`` = ``--train_iters``) and ``--log_interval`` = the block size. Its log function
(``RunLog.__call__``) is wrapped to take a time stamp at the "step 0" line, right before the loop, and
at every examples/s line: a block is everything tune.py does for those steps (batch collation and transfer,
autocast context, forward, backward, gradient clipping, optimizer and scheduler steps, zero_grad, loss
accumulation, the tqdm bar and its own log line); the step-0 validation, the final validation and the
checkpoint write fall outside every block. The hand loop takes the same stamps around its blocks.

Every stamp holds both CPU time (``time.process_time``) and wall time. The machine is shared: wall time of a
block moves with other people's jobs, CPU time of a one-thread loop (``OMP_NUM_THREADS=1``) hardly does, so
the verdict uses CPU time and the wall-time figure is shown beside it. The first block (allocation warm-up) is
dropped, the rate of a run is the median of its remaining blocks, and runs of the two loops alternate (tune
first in odd repeats, the hand loop first in even ones). overhead = median over repeats of (hand rate / tune
rate) - 1.

Both loops run with denormal floats flushed to zero (``torch.set_flush_denormal``; ``--keep_denormals`` turns
that off): the two loops' parameters drift apart (tune.py decays the learning rate and clips gradients), and
on the t5-small shape with prefix tuning the hand loop's backward pass met denormals and ran about 10% slower
for that reason alone, which would count as a negative overhead of tune.py.

    OMP_NUM_THREADS=1 .venv/bin/python bench/trainer_overhead.py            # full: default + t5-small shape
    OMP_NUM_THREADS=1 .venv/bin/python bench/trainer_overhead.py --quick    # seconds: default backbone only
"""

from __future__ import annotations

import contextlib
import io
import random
import re
import sys
import time
from pathlib import Path
from unittest import mock

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
)
from dataloader.crossfit import read_split  # noqa: E402
from dataloader.synthetic import SUITE_DIR  # noqa: E402
from models.backbone import load_backbone  # noqa: E402
from models.delta import attach_delta  # noqa: E402
from models.examples import encode_examples, training_batches  # noqa: E402
from models.settings import DEFAULT_MODEL_DIR
from models.trainer import RunLog  # noqa: E402
from utils.errors import UserInputError, run_cli  # noqa: E402

TASK = "overhead_task"
SOURCE_TASK, K, DATA_SEED = "sent_review", 64, 100  # 64 training examples: batches differ from step to step
SEED, LR = 42, 1e-3
MAX_INPUT, MAX_OUTPUT = 256, 32
BACKBONES = ("default", "t5-small")
LOG_RATE = re.compile(r"step (\d+): loss \S+ lr \S+ ([0-9.]+) examples/s")


def make_task_dir(root: Path) -> Path:
    """A task with the 64-shot training split of sent_review and a 1-example dev split (validation is cheap)."""
    lines = (SUITE_DIR / SOURCE_TASK / f"{SOURCE_TASK}_{K}_{DATA_SEED}_train.tsv").read_text(encoding="utf-8")
    folder = root / TASK
    folder.mkdir(parents=True)
    (folder / f"{TASK}_{K}_{DATA_SEED}_train.tsv").write_text(lines, encoding="utf-8")
    (folder / f"{TASK}_{K}_{DATA_SEED}_dev.tsv").write_text(lines.splitlines()[0] + "\n", encoding="utf-8")
    return root


def size_flags(method: str) -> list[str]:
    return [x for k, v in SCRIPT_SIZES[method].items() for x in (f"--{k}", str(v))]


def kept_blocks(rates: list[float]) -> list[float]:
    """Drop the first block (warm-up) when there is more than one."""
    return rates[1:] if len(rates) > 1 else rates


def block_rates(marks: list[tuple[float, float]], examples: int) -> tuple[list[float], list[float]]:
    """(CPU-time rates, wall-time rates) in examples/s between consecutive (process_time, perf_counter) stamps."""
    cpu = [examples / (b[0] - a[0]) for a, b in zip(marks, marks[1:])]
    wall = [examples / (b[1] - a[1]) for a, b in zip(marks, marks[1:])]
    return cpu, wall


def tune_rates(model_dir: Path, method: str, steps: int, block: int, bsz: int, task_dir: Path,
               out_dir: Path) -> tuple[list[float], list[float]]:
    """Examples/s of tune.py's own loop per block of ``block`` steps: (CPU time, wall time)."""
    from models.tune_flags import run_tune

    marks: list[tuple[float, float]] = []
    log_line = RunLog.__call__

    def stamped(self, message: str) -> None:
        log_line(self, message)
        if message.startswith("step 0 (") or (message.startswith("step ") and message.endswith("examples/s")):
            marks.append((time.process_time(), time.perf_counter()))

    argv = ["--do_train", "--tune_method", method, *size_flags(method), "--model", str(model_dir),
            "--task_dir", str(task_dir), "--tasks", TASK, "--k", str(K), "--data_seed", str(DATA_SEED),
            "--output_dir", str(out_dir), "--train_iters", str(steps), "--log_interval", str(block),
            "--valid_interval", str(steps), "--early_stop", "0", "--warmup_steps", "0",
            "--learning_rate_list", str(LR), "--bsz_list", str(bsz), "--seed", str(SEED),
            "--max_input_length", str(MAX_INPUT), "--max_output_length", str(MAX_OUTPUT), "--device", "cpu",
            "--quiet", "--log_file_only"]
    # The tqdm bar still runs; it just draws nowhere.
    with mock.patch.object(RunLog, "__call__", stamped), contextlib.redirect_stderr(io.StringIO()):
        code = run_tune(argv)
    if code != 0:
        raise RuntimeError(f"tune.py exited with {code}")
    log = next((out_dir / TASK).glob(f"lr_{LR!r}_bsz_{bsz}_*/log.txt")).read_text(encoding="utf-8")
    if len(marks) != steps // block + 1 or len(LOG_RATE.findall(log)) != steps // block:
        raise RuntimeError(f"{out_dir}: expected {steps // block} examples/s lines, found {len(marks) - 1}")
    return block_rates(marks, block * bsz)


def hand_rates(model_dir: Path, method: str, steps: int, block: int, bsz: int,
               task_dir: Path) -> tuple[list[float], list[float]]:
    """The minimal loop (forward, backward, AdamW step, zero_grad): examples/s per block, (CPU time, wall time)."""
    model, tokenizer = load_backbone(model_dir, None, "cpu")
    torch.manual_seed(SEED)
    attach_delta(model, script_config(method))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    examples = read_split(task_dir / TASK / f"{TASK}_{K}_{DATA_SEED}_train.tsv")
    encoded = encode_examples(tokenizer, examples, MAX_INPUT, MAX_OUTPUT)
    batches = training_batches(model, encoded, bsz, random.Random(SEED), tokenizer.pad_token_id)
    marks = [(time.process_time(), time.perf_counter())]
    for step in range(1, steps + 1):
        batch = next(batches)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % block == 0:
            marks.append((time.process_time(), time.perf_counter()))
    return block_rates(marks, block * bsz)


def measure(model_dir: Path, method: str, steps: int, block: int, bsz: int, reps: int, task_dir: Path,
            scratch: Path) -> dict[str, float]:
    runs: dict[str, list[float]] = {"tune": [], "hand": [], "cpu": [], "wall": []}
    for rep in range(reps):
        out = scratch / f"tune-{method}-{rep}-{time.monotonic_ns()}"
        got: dict[str, tuple[float, float]] = {}
        for which in (("tune", "hand") if rep % 2 == 0 else ("hand", "tune")):
            if which == "tune":
                cpu, wall = tune_rates(model_dir, method, steps, block, bsz, task_dir, out)
            else:
                cpu, wall = hand_rates(model_dir, method, steps, block, bsz, task_dir)
            got[which] = (median(kept_blocks(cpu)), median(kept_blocks(wall)))
        remove_tree(out)
        runs["tune"].append(got["tune"][0])
        runs["hand"].append(got["hand"][0])
        runs["cpu"].append(got["hand"][0] / got["tune"][0])
        runs["wall"].append(got["hand"][1] / got["tune"][1])
    return {"tune": median(runs["tune"]), "hand": median(runs["hand"]), "overhead": median(runs["cpu"]) - 1,
            "wall": median(runs["wall"]) - 1, "spread": max(runs["cpu"]) - min(runs["cpu"])}


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--backbones", nargs="+", default=None, choices=BACKBONES,
                   help="default: both (quick: default only)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--reps", type=int, default=None, help="interleaved repeats (default 3; quick 1)")
    p.add_argument("--bsz", type=int, default=8, help="training batch size (the study's target batch)")
    p.add_argument("--keep_denormals", action="store_true",
                   help="do not flush denormal floats to zero (see the module doc: they make speed depend on values)")
    p.add_argument("--steps_default", type=int, default=None,
                   help="steps per run on the default backbone (default 100; quick 20)")
    p.add_argument("--steps_small", type=int, default=None,
                   help="steps per run on the t5-small shape (default 30; quick 10)")
    a = p.parse_args(argv)
    backbones = a.backbones or (["default"] if a.quick else list(BACKBONES))
    reps = a.reps or (1 if a.quick else 3)
    steps = {"default": a.steps_default or (20 if a.quick else 100),
             "t5-small": a.steps_small or (10 if a.quick else 30)}
    check_positive("--reps/--bsz/--steps_*", [reps, a.bsz, *steps.values()])
    if K % a.bsz:
        raise UserInputError(f"--bsz: {a.bsz} does not divide the {K} training examples (every batch must be full)")
    for name, n in steps.items():  # five blocks of n/5 steps each: the first is dropped
        if n % 5:
            raise UserInputError(f"--steps_{'small' if name == 't5-small' else 'default'}: {n} is not a multiple "
                                 "of 5 (a run is timed in five equal blocks)")
    blocks = {name: n // 5 for name, n in steps.items()}

    # Both loops run with denormals flushed: on the t5-small shape with prefix tuning, the hand loop's values
    # (constant lr, no clipping) reach denormal floats that tune.py's (decaying lr, clipping) do not, which
    # slowed its backward pass by about 10% whatever the loop code; flushing makes the speed depend on the code.
    torch.set_flush_denormal(not a.keep_denormals)
    scratch = scratch_dir("overhead")
    rows = []
    try:
        task_dir = make_task_dir(scratch / "data")
        for name in backbones:
            model_dir = DEFAULT_MODEL_DIR
            if name == "t5-small":
                model_dir = save_random_backbone(scratch / "t5-small", "t5-small")
            for method in a.methods:
                r = measure(model_dir, method, steps[name], blocks[name], a.bsz, reps, task_dir, scratch)
                rows.append([name, method, steps[name], blocks[name], reps, fmt(r["tune"], 1), fmt(r["hand"], 1),
                             f"{r['overhead'] * 100:+.1f}%", f"{r['spread'] * 100:.1f}%", f"{r['wall'] * 100:+.1f}%",
                             "yes" if r["overhead"] <= 0.10 else "no"])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
    finally:
        remove_tree(scratch)

    header = ["backbone", "method", "steps/run", "block", "repeats", "tune.py ex/CPU-s", "hand loop ex/CPU-s",
              "overhead (CPU)", "ratio spread", "overhead (wall)", "<= 10%"]
    write_report(a.results_dir, "trainer_overhead", "tune.py training loop vs a minimal loop",
                 command_line("bench/trainer_overhead.py", argv), [markdown_table(header, rows)],
                 [f"batch size {a.bsz}, {K} training examples of {SOURCE_TASK}, CPU; ex/CPU-s: examples per second "
                  "of process CPU time, median over repeats of each run's median block rate (first block dropped)",
                  "overhead = median over repeats of (hand-loop rate / tune.py rate) - 1, in CPU time (the verdict) "
                  "and in wall time; negative: tune.py was faster in that pairing (noise); ratio spread = max - min "
                  "of the per-repeat CPU-time ratios; denormal floats flushed to zero in both loops"
                  + (" (off: --keep_denormals)" if a.keep_denormals else ""),
                  "t5-small: random weights of t5-small's shape (d_model 512, d_ff 2048, 6+6 layers, 8 heads) "
                  "with the default tokenizer's 1,017-token vocabulary"])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
