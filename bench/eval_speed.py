"""Validation cost of few-shot tuning, and cheaper ways to predict on the bundled suite's dev sets.

Part A: ``tune.main`` runs in this process with the study's target budget (LoRA r=8 alpha 16, 16-shot
split, 40 steps at batch 8, lr 3e-3, validation every 10 steps, max_output_length 16) on the tasks of
``--tasks``, once per decoding setting: ``--max_new_tokens 16`` (full budget), ``auto`` (tune.py's rule;
label tasks: the longest label + EOS) and ``--rank_classification``.
``Trainer.train`` and ``Trainer.evaluate`` are wrapped with timers: the validation share is the time spent
in evaluate (step 0 and every validation) over the time of train() (which also holds the training steps, the
curve and the checkpoint write). One short untimed tune.py run warms up first. All times in this bench are
CPU times of this one-thread process (``time.process_time``): on a shared machine they hardly move with
other people's jobs, where wall times do.

Part B: with the modules that Part A's ``auto`` runs kept (best dev step), each task's 64-example dev split of
the large split (``k=512``) is predicted with models.examples at batch ``--batch_size``: generation with
batches in file order vs sorted by input length (full budget), full vs short budget (tune.py's ``auto`` rule,
label tasks), and generation vs rank classification (label tasks; agreement = share of identical
predictions). Variants alternate within each repeat, after one untimed round; times are medians over
repeats of the summed prediction time over tasks (module loading excluded).

    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_speed.py           # all 20 bundled tasks
    OMP_NUM_THREADS=1 .venv/bin/python bench/eval_speed.py --quick   # 2 tasks, 10 steps
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from pathlib import Path
from unittest import mock

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    SCRIPT_SIZES,
    bench_parser,
    check_positive,
    command_line,
    fmt,
    markdown_table,
    median,
    remove_tree,
    scratch_dir,
    script_config,
    write_report,
)
from dataloader.crossfit import load_task  # noqa: E402
from dataloader.metrics import metric_for_task, score  # noqa: E402
from dataloader.synthetic import SUITE_DIR  # noqa: E402
from models import examples as seq2seq  # noqa: E402
from models.backbone import load_backbone  # noqa: E402
from models.delta import attach_delta, load_delta_state  # noqa: E402
from models.evaluate import decoding_for  # noqa: E402
from models.formats import load_delta_checkpoint  # noqa: E402
from models.run_folders import read_result_tsv, resolve_checkpoint  # noqa: E402
from models.settings import DEFAULT_MODEL_DIR, TrainConfig
from models.trainer import Trainer  # noqa: E402
from task_list import resolve_tasks  # noqa: E402
from utils.errors import run_cli  # noqa: E402

METHOD = "lora"
MAX_INPUT, MAX_OUTPUT = 256, 16  # study.py's max_input_length and max_output_length
BUDGET = {"k": 16, "data_seed": 100, "train_iters": 40, "learning_rate_list": 3e-3, "bsz_list": 8,
          "warmup_steps": 4, "valid_interval": 10, "early_stop": 0, "log_interval": 10}  # study.py's target budget
LARGE_K = 512
SETTINGS = {"full": ["--max_new_tokens", str(MAX_OUTPUT)], "auto": [], "rank": ["--rank_classification"]}


# --------------------------------------------------------------------------------------------------
# Part A


def timed_tune(tasks: list[str], out: Path, extra: list[str], budget: dict) -> dict[str, float]:
    """Run tune.main with timers around Trainer.train_group and Trainer.evaluate (validation inside training only)."""
    from models.tune_flags import run_tune

    totals = {"train": 0.0, "valid": 0.0, "validations": 0}
    inside = [False]
    evaluate, train = Trainer.evaluate, Trainer.train_group

    def timed_evaluate(self, *args, **kwargs):
        start = time.process_time()
        result = evaluate(self, *args, **kwargs)
        if inside[0]:
            totals["valid"] += time.process_time() - start
            totals["validations"] += 1
        return result

    def timed_train(self, *args, **kwargs):
        inside[0] = True
        start = time.process_time()
        try:
            return train(self, *args, **kwargs)
        finally:
            totals["train"] += time.process_time() - start
            inside[0] = False

    flags = [x for k, v in {**BUDGET, **budget}.items() for x in (f"--{k}", str(v))]
    sizes = [x for k, v in SCRIPT_SIZES[METHOD].items() for x in (f"--{k}", str(v))]
    argv = ["--do_train", "--tune_method", METHOD, *sizes, "--tasks", *tasks, "--output_dir", str(out),
            "--max_input_length", str(MAX_INPUT), "--max_output_length", str(MAX_OUTPUT), "--device", "cpu",
            "--quiet", "--log_file_only", "--group_size", "1", *flags, *extra]  # one run at a time: its own share
    with (mock.patch.object(Trainer, "evaluate", timed_evaluate),
          mock.patch.object(Trainer, "train_group", timed_train),
          contextlib.redirect_stderr(io.StringIO())):
        code = run_tune(argv)
    if code != 0:
        raise RuntimeError(f"tune.py exited with {code}")
    rows = read_result_tsv(out / "result.tsv")
    totals["dev"] = sum(float(r["dev"]) for r in rows) / len(rows)
    return totals


# --------------------------------------------------------------------------------------------------
# Part B


def load_dev_sets(tasks: list[str], tokenizer) -> dict[str, dict]:
    """Per task: the 64-example dev split of the large split, its metric, label set and tune.py's decoding."""

    config = TrainConfig(max_new_tokens="auto", num_beams=1, max_output_length=MAX_OUTPUT)
    out = {}
    for t in tasks:
        raw = load_task(SUITE_DIR, t, LARGE_K, 100, ["train", "dev"])
        metric = metric_for_task(t, SUITE_DIR)
        examples = raw["train"] + raw["dev"]
        out[t] = {"encoded": seq2seq.encode_examples(tokenizer, raw["dev"], MAX_INPUT, MAX_OUTPUT),
                  "metric": metric, "labels": seq2seq.label_set(examples, metric),
                  "decoding": decoding_for(config, tokenizer, metric, examples)}
    return out


def run_variants(model, tokenizer, modules: dict[str, dict], dev: dict[str, dict], batch_size: int,
                 reps: int) -> dict[str, dict]:
    """Time every prediction variant, alternating them within each repeat; keep the last predictions."""
    label_tasks = [t for t in dev if dev[t]["labels"]]
    short_tasks = [t for t in label_tasks if dev[t]["decoding"].max_new_tokens < MAX_OUTPUT]

    def gen(t: str, sort: bool, short: bool) -> list[str]:
        budget = dev[t]["decoding"].max_new_tokens if short else MAX_OUTPUT
        return seq2seq.generate(model, tokenizer, dev[t]["encoded"], batch_size, budget, sort_by_length=sort)

    variants = {
        "unsorted": (list(dev), lambda t: gen(t, False, False)),
        "sorted": (list(dev), lambda t: gen(t, True, False)),
        "label:full": (short_tasks, lambda t: gen(t, True, False)),
        "label:short": (short_tasks, lambda t: gen(t, True, True)),
        "label:generate": (label_tasks, lambda t: gen(t, True, True)),
        "label:rank": (label_tasks, lambda t: seq2seq.rank_classify(model, tokenizer, dev[t]["encoded"],
                                                                      dev[t]["labels"], batch_size)),
    }
    results = {name: {"tasks": tasks, "times": [], "predictions": {}} for name, (tasks, _) in variants.items()}
    for rep in range(reps + 1):  # the first round warms every code path up and is not timed
        for name, (tasks, fn) in variants.items():
            total = 0.0
            for t in tasks:
                load_delta_state(model, modules[t], t)
                start = time.process_time()
                results[name]["predictions"][t] = fn(t)
                total += time.process_time() - start
            if rep > 0:
                results[name]["times"].append(total)
    return results


def compare(results: dict[str, dict], dev: dict[str, dict], a: str, b: str, what: str) -> list:
    ra, rb = results[a], results[b]
    tasks = ra["tasks"]
    if not tasks:
        return [what, 0, "-", "-", "-", "-", "-", "-"]
    ta, tb = median(ra["times"]), median(rb["times"])
    pairs = [(x, y) for t in tasks for x, y in zip(ra["predictions"][t], rb["predictions"][t])]
    same = sum(x == y for x, y in pairs) / len(pairs)

    def mean_score(r: dict) -> float:
        golds = {t: [list(ex.outputs) for ex in dev[t]["encoded"].examples] for t in tasks}
        return sum(score(dev[t]["metric"], r["predictions"][t], golds[t]) for t in tasks) / len(tasks)

    return [what, len(tasks), fmt(ta), fmt(tb), f"{ta / tb:.2f}x", f"{same:.3f}", f"{mean_score(ra):.3f}",
            f"{mean_score(rb):.3f}"]


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--tasks", nargs="+", default=None,
                   help="bundled tasks or lists (default ALL_TASKS; quick: sent_review qa_which)")
    p.add_argument("--batch_size", type=int, default=16, help="prediction batch size in Part B")
    p.add_argument("--reps", type=int, default=None, help="repeats of Part B (default 3; quick 1)")
    a = p.parse_args(argv)
    tasks = resolve_tasks(a.tasks or (["sent_review", "qa_which"] if a.quick else ["ALL_TASKS"]))
    reps = a.reps or (1 if a.quick else 3)
    check_positive("--batch_size/--reps", [a.batch_size, reps])
    budget = {"train_iters": 10, "valid_interval": 5, "log_interval": 5} if a.quick else {}

    scratch = scratch_dir("eval")
    tables = []
    try:
        timed_tune(tasks[:1], scratch / "warm-up", [], {"train_iters": 4, "valid_interval": 2, "log_interval": 2})
        share_rows = []
        for name, extra in SETTINGS.items():
            r = timed_tune(tasks, scratch / name, extra, budget)
            share_rows.append([name, fmt(r["train"]), fmt(r["valid"]), int(r["validations"]),
                               f"{r['valid'] / r['train'] * 100:.0f}%", f"{r['dev']:.3f}"])
            print(" | ".join(str(c) for c in share_rows[-1]), flush=True)
        tables.append(markdown_table(["validation", "train() CPU s", "of which validation", "validations",
                                      "validation share", "mean best dev"], share_rows))
        model, tokenizer = load_backbone(DEFAULT_MODEL_DIR, None, "cpu")
        torch.manual_seed(42)
        attach_delta(model, script_config(METHOD))
        modules = {t: load_delta_checkpoint(resolve_checkpoint(scratch / "auto" / t, t))[0] for t in tasks}
        dev = load_dev_sets(tasks, tokenizer)
        results = run_variants(model, tokenizer, modules, dev, a.batch_size, reps)
        rows = [compare(results, dev, "unsorted", "sorted", "file order -> sorted by length (generation)"),
                compare(results, dev, "label:full", "label:short",
                        f"max_new_tokens {MAX_OUTPUT} -> auto (label tasks)"),
                compare(results, dev, "label:generate", "label:rank",
                        "generation (auto) -> rank classification (label tasks)")]
        tables.append(markdown_table(["comparison", "tasks", "A CPU s", "B CPU s", "speed-up A/B",
                                      "same predictions", "mean score A", "mean score B"], rows))
    finally:
        remove_tree(scratch)

    n_tasks = len(tasks)
    notes = [f"Part A: {n_tasks} task(s), LoRA r=8 on the embedded default, study.py's target budget "
             f"({'10 steps, validation every 5' if a.quick else '40 steps, validation every 10'}; 16 dev examples); "
             "train() CPU s and its validation part are sums over the tasks",
             f"Part B: the 64-example dev splits (k={LARGE_K}), batch {a.batch_size}, medians of {reps} repeat(s); "
             "the modules are Part A's auto runs; 'same predictions' is the share of identical predictions "
             "(for generation vs rank classification: the agreement rate)"]
    write_report(a.results_dir, "eval_speed", "Validation share and prediction speed",
                 command_line("bench/eval_speed.py", argv), tables, notes)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
