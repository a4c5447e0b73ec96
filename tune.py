"""Tune a delta module (bottleneck adapter, LoRA, prefix or (IA)³) of a frozen T5 on few-shot tasks.

For each task and each (learning rate, batch size) of the sweep: train only the delta parameters
with AdamW and linear warmup/decay, validate by generation + the task's metric every
``--valid_interval`` steps, keep the best module, stop after ``--early_stop`` validations without
gain, then predict on test with the best module (or with ``--test_checkpoint``).

Writes ``{output_dir}/{task}/lr_{lr}_bsz_{bsz}/`` (log.txt, curve.tsv, checkpoint/, predictions)
and one ``{output_dir}/result.tsv`` with a row per run. A run folder appears only once complete.

    python tune.py --do_train --do_predict --tune_method lora --tasks SAMPLE_TASKS --output_dir runs/lora
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from tqdm.auto import tqdm

from dataloader.crossfit import Example, load_task
from dataloader.metrics import metric_for_task
from dataloader.synthetic import SUITE_DIR
from models.backbone import quiet_libraries
from models.delta import METHODS, DeltaConfig, add_size_flags, load_delta_state
from models.run_folders import (
    read_result_tsv,
    run_dir_name,
    update_result_tsv,
)
from models.sizes import METHOD_SIZES
from models.trainer import (
    Distributed,
    RunLog,
    TaskData,
    TrainConfig,
    Trainer,
    default_warmup,
    fmt_score,
    init_distributed,
)
from task_list import resolve_tasks_in
from utils.errors import UserInputError, run_cli
from utils.io import check_output_folder, staged_dir, write_text_atomic

REPO = Path(__file__).resolve().parent
DEFAULT_TASK_DIR = SUITE_DIR


def build_parser() -> argparse.ArgumentParser:
    D = TrainConfig()  # the trainer's defaults are the flags' defaults
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("runs and sweeps")
    run.add_argument("--do_train", action="store_true", help="train a delta module on each task")
    run.add_argument("--do_predict", action="store_true", help="score the test split")
    run.add_argument("--learning_rate_list", type=float, nargs="+", default=[5e-4], metavar="LR",
                     help="learning rates to sweep (each is a run)")
    run.add_argument("--bsz_list", type=int, nargs="+", default=[8], metavar="BSZ", help="batch sizes to sweep")
    run.add_argument("--train_iters", type=int, default=D.train_iters, help="training steps per run")
    run.add_argument("--warmup_steps", type=int, default=None,
                     help="linear warm-up steps (default: a tenth of --train_iters)")
    run.add_argument("--valid_interval", type=int, default=D.valid_interval, help="validate every N steps")
    run.add_argument("--log_interval", type=int, default=D.log_interval,
                     help="log loss, lr and examples/s every N steps")
    run.add_argument("--early_stop", type=int, default=D.early_stop,
                     help="stop after N validations without gain (0: never)")
    run.add_argument("--predict_batch_size", type=int, default=D.predict_batch_size, help="batch size of generation")
    run.add_argument("--weight_decay", type=float, default=D.weight_decay)
    run.add_argument("--max_grad_norm", type=float, default=D.max_grad_norm)
    run.add_argument("--overwrite", action="store_true", help="replace run folders that already exist")
    run.add_argument("--log_file_only", action="store_true",
                     help="write log lines only to each run's log.txt (progress bars stay); for drivers like study.py")
    run.add_argument("--save_last", action="store_true",
                     help="keep the module of the last step, not the best dev one (no model selection)")

    delta = p.add_argument_group("delta module")
    delta.add_argument("--tune_method", default="adapter", help=f"one of {', '.join(METHODS)}")
    delta.add_argument("--apply_adapter", action="store_true", help="same as --tune_method adapter")
    add_size_flags(delta, METHOD_SIZES["paper"])  # the paper's sizes, as DeltaConfig's defaults
    delta.add_argument("--quiet", action="store_true", help="silence data-processing and library warnings")

    paths = p.add_argument_group("paths")
    paths.add_argument("--model", default=D.model, help="T5 folder or hub id (default: embedded)")
    paths.add_argument("--tokenizer_path", default=None, help="tokenizer folder or hub id (default: --model)")
    paths.add_argument("--task_dir", default=str(DEFAULT_TASK_DIR), help="CrossFit-layout data folder")
    paths.add_argument("--output_dir", default="runs/tune")
    paths.add_argument("--train_checkpoint", default=None,
                       help="initialise the delta module from this checkpoint (a fused one too)")
    paths.add_argument("--test_checkpoint", default=None, help="predict with this checkpoint")

    data = p.add_argument_group("data and decoding")
    data.add_argument("--tasks", nargs="+", default=["SAMPLE_TASKS"], help="task names or named lists (task_list.py)")
    data.add_argument("--k", type=int, default=D.k, help="shots: picks {task}_{k}_{seed}_{split}.tsv")
    data.add_argument("--data_seed", type=int, default=D.data_seed, help="data seed: picks the few-shot files")
    data.add_argument("--seed", type=int, default=D.seed, help="seed of initialisation, batching and dropout")
    data.add_argument("--max_input_length", type=int, default=D.max_input_length)
    data.add_argument("--max_output_length", type=int, default=D.max_output_length)
    data.add_argument("--num_beams", type=int, default=D.num_beams)
    data.add_argument("--max_new_tokens", default=D.max_new_tokens,
                      help="generation budget at validation and test: auto (label tasks: the longest label + EOS, "
                           "which cuts only outputs that are not labels; other tasks: --max_output_length) "
                           "or a number")
    data.add_argument("--rank_classification", action="store_true",
                      help="score label tasks by the likelihood of each label instead of generating (others generate)")
    data.add_argument("--device", default=D.device, help="auto (cuda when present), cpu, cuda or cuda:N")
    data.add_argument("--bf16", action="store_true", help="bf16 autocast on GPU")
    return p


def check_args(args: argparse.Namespace) -> DeltaConfig:
    """Validate flags before anything is loaded or written."""
    if not (args.do_train or args.do_predict):
        raise UserInputError("nothing to do: give --do_train and/or --do_predict")
    if args.apply_adapter:
        if args.tune_method not in ("adapter",):
            raise UserInputError(f"--apply_adapter conflicts with --tune_method {args.tune_method}")
    for lr in args.learning_rate_list:
        if not math.isfinite(lr) or lr <= 0:
            raise UserInputError(f"--learning_rate_list: expected positive finite numbers, found {lr}")
    positive = {"--bsz_list": args.bsz_list, "--train_iters": [args.train_iters],
                "--valid_interval": [args.valid_interval], "--log_interval": [args.log_interval],
                "--predict_batch_size": [args.predict_batch_size], "--k": [args.k],
                "--max_input_length": [args.max_input_length], "--max_output_length": [args.max_output_length],
                "--num_beams": [args.num_beams]}
    for flag, values in positive.items():
        for v in values:
            if v <= 0:
                raise UserInputError(f"{flag}: expected a positive integer, found {v}")
    if args.max_new_tokens != "auto":
        try:
            args.max_new_tokens = int(args.max_new_tokens)
        except ValueError:
            raise UserInputError(f"--max_new_tokens: expected auto or a positive integer, found "
                                 f"{args.max_new_tokens!r}") from None
        if args.max_new_tokens <= 0:
            raise UserInputError(f"--max_new_tokens: expected auto or a positive integer, found {args.max_new_tokens}")
    if args.warmup_steps is None:
        args.warmup_steps = default_warmup(args.train_iters)
    for flag, v in {"--warmup_steps": args.warmup_steps, "--early_stop": args.early_stop}.items():
        if v < 0:
            raise UserInputError(f"{flag}: expected zero or more, found {v}")
    if len(set(args.learning_rate_list)) != len(args.learning_rate_list) or len(set(args.bsz_list)) != len(
            args.bsz_list):
        raise UserInputError("--learning_rate_list/--bsz_list: a value is listed twice")
    if args.do_predict and not args.do_train and not (args.test_checkpoint or args.train_checkpoint):
        raise UserInputError("--do_predict without --do_train needs --test_checkpoint (or --train_checkpoint)")
    return DeltaConfig.from_flags(args.tune_method, vars(args))


@dataclass
class SweepInputs:
    """A command line checked against the disk: everything ``run_all`` needs, before anything is written."""

    cfg: DeltaConfig
    tasks: list[str]
    splits: list[str]
    raw: dict[str, dict[str, list[Example]]]
    metrics: dict[str, str]
    runs: list[tuple[str, float, int]]  # (task, lr, bsz) of the sweep
    output_dir: Path


def check_inputs(args: argparse.Namespace) -> SweepInputs:
    """Validate flags, data and the output folder (earlier runs are refused unless --overwrite)."""
    if args.apply_adapter:
        args.tune_method = "adapter"
    cfg = check_args(args)
    task_dir, tasks = resolve_tasks_in(args.task_dir, args.tasks)
    splits = (["train", "dev"] if args.do_train else ["dev"]) + (["test"] if args.do_predict else [])
    raw = {t: load_task(task_dir, t, args.k, args.data_seed, splits) for t in tasks}
    metrics = {t: metric_for_task(t, task_dir) for t in tasks}
    output_dir = check_output_folder(args.output_dir)
    runs = [(t, lr, bsz) for t in tasks for lr in args.learning_rate_list for bsz in args.bsz_list]
    if not args.overwrite:
        # Per output, so parallel jobs of one sweep can share the folder: training writes the run folders,
        # prediction alone writes {task}/predict.
        if args.do_train:
            existing, kind = [output_dir / t / run_dir_name(lr, bsz) for t, lr, bsz in runs], "run"
        else:
            existing, kind = [output_dir / t / "predict" for t in tasks], "prediction"
        existing = [d for d in existing if d.exists()]
        if existing:
            raise UserInputError(f"{existing[0]}: {kind} folder exists (from an earlier run); pass --overwrite to "
                                 "replace it or choose another --output_dir")
    if (output_dir / "result.tsv").is_file():
        read_result_tsv(output_dir / "result.tsv")  # refuse a malformed one now rather than after training
    return SweepInputs(cfg, tasks, splits, raw, metrics, runs, output_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    inputs = check_inputs(args)  # everything that can be wrong is checked before the first file is written
    if args.quiet:
        quiet_libraries()
    ddp, device = init_distributed(args.device)
    try:
        return run_all(args, inputs, ddp, device)
    finally:
        if ddp.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run_all(args: argparse.Namespace, inputs: SweepInputs, ddp: Distributed, device: str) -> int:
    """Every run of the sweep (or the predictions of a checkpoint); only rank 0 writes files and logs."""
    cfg, tasks, splits, raw, metrics, runs, output_dir = (
        inputs.cfg, inputs.tasks, inputs.splits, inputs.raw, inputs.metrics, inputs.runs, inputs.output_dir)
    trainer = Trainer(TrainConfig.from_values(args), cfg, ddp, device)
    data = {}
    for t in tasks:
        decoding = trainer.config.plan_decoding(trainer.tokenizer, metrics[t],
                                 [ex for s in ("train", "dev") if s in raw[t] for ex in raw[t][s]])
        data[t] = TaskData(t, metrics[t], {s: trainer.encode(raw[t][s]) for s in splits}, decoding)
    main_rank = ddp.is_main
    if main_rank:
        output_dir.mkdir(parents=True, exist_ok=True)
    say = print if main_rank and not args.log_file_only else (lambda *a, **k: None)
    processes = f"; {ddp.world} processes, each on its share of every batch" if ddp.world > 1 else ""
    say(f"{len(tasks)} task(s), {len(runs) if args.do_train else len(tasks)} run(s): method {cfg.describe()} "
          f"on {trainer.backbone} ({trainer.device}{processes}); output in {output_dir}", flush=True)

    def staged(final: Path):  # rank 0 builds the run folder; other ranks get None and write nothing
        return staged_dir(final) if main_rank else nullcontext(None)

    def run_log(tmp: Path | None) -> RunLog:
        return RunLog(tmp / "log.txt" if tmp else None, console=main_rank and not args.log_file_only)

    if not args.do_train:
        if trainer.test_state is None:  # --train_checkpoint only: predict with it
            trainer.test_state = trainer.init_state
        for t in tasks:
            with staged(output_dir / t / "predict") as tmp:
                log = run_log(tmp)
                load_delta_state(trainer.model, trainer.test_state, "test checkpoint")
                log(f"{t}: {data[t].decoding.describe()}")
                dev, _ = trainer.evaluate(data[t], "dev", desc="dev")
                log(f"{t}: dev {data[t].metric} {dev:.4f}")
                test = trainer.predict(data[t], tmp, log)
                log.close()
            if main_rank:
                update_result_tsv(output_dir, {"task": t, "k": args.k, "data_seed": args.data_seed, "lr": "-",
                                               "bsz": "-", "dev": fmt_score(dev), "test": fmt_score(test),
                                               "best_step": "-"})
        return 0

    for t, lr, bsz in tqdm(runs, desc="runs", disable=len(runs) == 1 or not main_rank):
        with staged(output_dir / t / run_dir_name(lr, bsz)) as tmp:
            log = run_log(tmp)
            try:
                log(f"task {t} ({data[t].metric}), {len(raw[t]['train'])} train / {len(raw[t]['dev'])} dev "
                    f"examples, lr {lr:g}, bsz {bsz}, {cfg.describe()}")
                result = trainer.train(data[t], lr, bsz, log, tmp)
            finally:
                log.close()
            if tmp is not None:
                write_text_atomic(tmp / "result.json", json.dumps(
                    {"task": t, "lr": lr, "bsz": bsz, "dev": result.dev, "test": result.test,
                     "best_step": result.best_step}))
        if main_rank:
            update_result_tsv(output_dir, {"task": t, "k": args.k, "data_seed": args.data_seed, "lr": f"{lr:g}",
                                           "bsz": bsz, "dev": fmt_score(result.dev), "test": fmt_score(result.test),
                                           "best_step": result.best_step})
        say(f"{t} lr={lr:g} bsz={bsz}: dev {fmt_score(result.dev)} test {fmt_score(result.test)} "
              f"(best step {result.best_step})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
