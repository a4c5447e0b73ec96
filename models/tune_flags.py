"""The command line of tune.py: its flags and the typed sweep they ask for, importable without torch."""

from __future__ import annotations

import argparse
from dataclasses import fields

from models.methods import METHODS, add_size_flags
from models.settings import TuneConfig, add_allow_other_backbone_arg, add_group_size_arg
from models.sizes import METHOD_SIZES
from utils.errors import UserInputError
from utils.params import HelpFormatter, field_defaults


def tune_parser(description: str | None) -> argparse.ArgumentParser:
    """tune.py's flags, declared from ``TuneConfig``'s defaults (sweep.py parses a job's flags with them too)."""
    D = argparse.Namespace(**field_defaults(TuneConfig))  # the library's defaults are the flags' defaults
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    run = p.add_argument_group("runs and sweeps")
    run.add_argument("--do_train", action="store_true", help="train a delta module on each task")
    run.add_argument("--do_predict", action="store_true", help="score the test split")
    run.add_argument("--learning_rate_list", type=float, nargs="+", default=D.learning_rate_list, metavar="LR",
                     help="learning rates to sweep (each is a run)")
    run.add_argument("--bsz_list", type=int, nargs="+", default=D.bsz_list, metavar="BSZ", help="batch sizes to sweep")
    run.add_argument("--train_iters", type=int, default=D.train_iters, help="training steps per run")
    run.add_argument("--warmup_steps", type=int, default=None,
                     help="linear warm-up steps (default: a tenth of --train_iters)")
    run.add_argument("--valid_interval", type=int, default=D.valid_interval, help="validate every N steps")
    run.add_argument("--log_interval", type=int, default=D.log_interval,
                     help="log loss, lr and examples/s every N steps")
    run.add_argument("--early_stop", type=int, default=D.early_stop,
                     help="stop after N validations without gain (0: never)")
    run.add_argument("--predict_batch_size", type=int, default=D.predict_batch_size, help="batch size of generation")
    run.add_argument("--weight_decay", type=float, default=D.weight_decay, help="AdamW weight decay")
    run.add_argument("--max_grad_norm", type=float, default=D.max_grad_norm,
                     help="clip the delta parameters' gradient to this norm (0: no clipping)")
    run.add_argument("--overwrite", action="store_true", help="replace run folders that already exist")
    run.add_argument("--resume", action="store_true",
                     help="skip each run whose folder holds a finished run of the same settings (a run of other "
                          "settings is refused); without it an existing run folder is refused")
    run.add_argument("--log_file_only", action="store_true",
                     help="write log lines only to each run's log.txt (progress bars stay); for drivers like study.py")
    add_group_size_arg(run, D.group_size)
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
    paths.add_argument("--task_dir", default=D.task_dir, help="CrossFit-layout data folder")
    paths.add_argument("--output_dir", default=D.output_dir,
                       help="run folders {output_dir}/{task}/lr_*_..._{hash}/ and result.tsv go here")
    paths.add_argument("--train_checkpoint", default=None,
                       help="initialise the delta module from this checkpoint (a fused one too)")
    paths.add_argument("--test_checkpoint", default=None, help="predict with this checkpoint")
    paths.add_argument("--export_peft", default=D.export_peft, metavar="DIR",
                       help="also write each run's best LoRA module as a PEFT adapter folder, DIR/{task}/{run}")
    add_allow_other_backbone_arg(paths)

    data = p.add_argument_group("data and decoding")
    data.add_argument("--tasks", nargs="+", default=D.tasks, help="task names or named lists (task_list.py)")
    data.add_argument("--k", type=int, default=D.k, help="shots: picks {task}_{k}_{seed}_{split}.tsv")
    data.add_argument("--data_seed", type=int, default=D.data_seed, help="data seed: picks the few-shot files")
    data.add_argument("--seed", type=int, default=D.seed, help="seed of initialisation, batching and dropout")
    data.add_argument("--max_input_length", type=int, default=D.max_input_length, help="truncate inputs to N tokens")
    data.add_argument("--max_output_length", type=int, default=D.max_output_length,
                      help="truncate answers to N tokens (and generate at most N)")
    data.add_argument("--num_beams", type=int, default=D.num_beams,
                      help="beam width at validation and test (1: greedy)")
    data.add_argument("--max_new_tokens", default=D.max_new_tokens,
                      help="generation budget at validation and test: auto (label tasks: the longest label + EOS, "
                           "which cuts only outputs that are not labels; other tasks: --max_output_length) "
                           "or a number")
    data.add_argument("--rank_classification", action="store_true",
                      help="score label tasks by the likelihood of each label instead of generating (others generate)")
    data.add_argument("--device", default=D.device, help="auto (cuda when present), cpu, cuda or cuda:N")
    data.add_argument("--bf16", action="store_true", help="bf16 autocast on GPU")
    return p


def config_from_args(args: argparse.Namespace) -> TuneConfig:
    """The typed sweep these flags ask for (translation only; ``models.tuning.check_config`` validates it)."""
    if args.apply_adapter:
        if args.tune_method not in ("adapter",):
            raise UserInputError(f"--apply_adapter conflicts with --tune_method {args.tune_method}")
        args.tune_method = "adapter"
    max_new_tokens = args.max_new_tokens
    if max_new_tokens != "auto":
        try:
            max_new_tokens = int(max_new_tokens)
        except ValueError:
            raise UserInputError(f"--max_new_tokens: expected auto or a positive integer, found "
                                 f"{max_new_tokens!r}") from None
    from models.delta import DeltaConfig

    delta = DeltaConfig.from_flags(args.tune_method, vars(args))
    values = {f.name: getattr(args, f.name) for f in fields(TuneConfig) if f.name != "delta"}
    return TuneConfig(**{**values, "max_new_tokens": max_new_tokens}, delta=delta)


def run_tune(argv: list[str] | None) -> int:
    """What tune.py runs: its flags parsed, then the sweep (the benchmarks call this in their own process)."""
    args = tune_parser(None).parse_args(argv)
    from models.tuning import run_sweep  # after the flags: --help and a refused flag need no torch

    run_sweep(config_from_args(args))
    return 0
