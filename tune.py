"""Tune a delta module (bottleneck adapter, LoRA or prefix) of a frozen T5 on few-shot tasks.

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
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dataloader.crossfit import Example, load_task
from dataloader.metrics import metric_for_task, score
from dataloader.synthetic import SUITE_DIR
from models.backbone import DEFAULT_MODEL_DIR, backbone_name, load_backbone, pick_device, quiet_libraries
from models.checkpoints import (
    CHECKPOINT_SUBDIR,
    read_result_tsv,
    resolve_checkpoint,
    run_dir_name,
    update_result_tsv,
)
from models.delta import (
    ADAPTER_TYPES,
    METHODS,
    DeltaConfig,
    attach_delta,
    backbone_fingerprint,
    check_compatible,
    delta_state_dict,
    load_delta_state,
    save_delta_checkpoint,
)
from models.formats import load_delta_checkpoint
from models.seq2seq import EncodedTask, collate, encode_examples, label_set, predict, to_device, training_examples
from task_list import resolve_tasks_in
from utils.errors import UserInputError, run_cli
from utils.io import check_output_folder, staged_dir, write_text_atomic, write_tsv_atomic

REPO = Path(__file__).resolve().parent
DEFAULT_TASK_DIR = SUITE_DIR


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("runs and sweeps")
    run.add_argument("--do_train", action="store_true", help="train a delta module on each task")
    run.add_argument("--do_predict", action="store_true", help="score the test split")
    run.add_argument("--learning_rate_list", type=float, nargs="+", default=[5e-4], metavar="LR",
                     help="learning rates to sweep (each is a run)")
    run.add_argument("--bsz_list", type=int, nargs="+", default=[8], metavar="BSZ", help="batch sizes to sweep")
    run.add_argument("--train_iters", type=int, default=1000, help="training steps per run")
    run.add_argument("--warmup_steps", type=int, default=200, help="linear warm-up steps")
    run.add_argument("--valid_interval", type=int, default=100, help="validate every N steps")
    run.add_argument("--log_interval", type=int, default=20, help="log loss, lr and examples/s every N steps")
    run.add_argument("--early_stop", type=int, default=10,
                     help="stop after N validations without gain (0: never)")
    run.add_argument("--predict_batch_size", type=int, default=64, help="batch size of generation")
    run.add_argument("--weight_decay", type=float, default=0.0)
    run.add_argument("--max_grad_norm", type=float, default=1.0)
    run.add_argument("--overwrite", action="store_true", help="replace run folders that already exist")
    run.add_argument("--log_file_only", action="store_true",
                     help="write log lines only to each run's log.txt (progress bars stay); for drivers like study.py")
    run.add_argument("--save_last", action="store_true",
                     help="keep the module of the last step, not the best dev one (no model selection)")

    delta = p.add_argument_group("delta module")
    delta.add_argument("--tune_method", default="adapter", help=f"one of {', '.join(METHODS)}")
    delta.add_argument("--apply_adapter", action="store_true", help="same as --tune_method adapter")
    delta.add_argument("--adapter_type", default="houlsby", help=f"one of {', '.join(ADAPTER_TYPES)}")
    delta.add_argument("--adapter_size", type=int, default=12, help="bottleneck width of the adapter")
    delta.add_argument("--lora_r", type=int, default=10)
    delta.add_argument("--lora_alpha", type=int, default=16)
    delta.add_argument("--prefix_length", type=int, default=120)
    delta.add_argument("--prefix_mlp", type=int, default=24, help="hidden size of the prefix's reparametrisation MLP")
    delta.add_argument("--quiet", action="store_true", help="silence data-processing and library warnings")

    paths = p.add_argument_group("paths")
    paths.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="T5 folder or hub id (default: embedded)")
    paths.add_argument("--tokenizer_path", default=None, help="tokenizer folder or hub id (default: --model)")
    paths.add_argument("--task_dir", default=str(DEFAULT_TASK_DIR), help="CrossFit-layout data folder")
    paths.add_argument("--output_dir", default="runs/tune")
    paths.add_argument("--train_checkpoint", default=None,
                       help="initialise the delta module from this checkpoint (a fused one too)")
    paths.add_argument("--test_checkpoint", default=None, help="predict with this checkpoint")

    data = p.add_argument_group("data and decoding")
    data.add_argument("--tasks", nargs="+", default=["SAMPLE_TASKS"], help="task names or named lists (task_list.py)")
    data.add_argument("--k", type=int, default=16, help="shots: picks {task}_{k}_{seed}_{split}.tsv")
    data.add_argument("--data_seed", type=int, default=100, help="data seed: picks the few-shot files")
    data.add_argument("--seed", type=int, default=42, help="seed of initialisation, batching and dropout")
    data.add_argument("--max_input_length", type=int, default=256)
    data.add_argument("--max_output_length", type=int, default=32)
    data.add_argument("--num_beams", type=int, default=1)
    data.add_argument("--max_new_tokens", default="auto",
                      help="generation budget at validation and test: auto (label tasks: the longest label + EOS, "
                           "which cuts only outputs that are not labels; other tasks: --max_output_length) "
                           "or a number")
    data.add_argument("--rank_classification", action="store_true",
                      help="score label tasks by the likelihood of each label instead of generating (others generate)")
    data.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
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
    for flag, v in {"--warmup_steps": args.warmup_steps, "--early_stop": args.early_stop}.items():
        if v < 0:
            raise UserInputError(f"{flag}: expected zero or more, found {v}")
    if len(set(args.learning_rate_list)) != len(args.learning_rate_list) or len(set(args.bsz_list)) != len(
            args.bsz_list):
        raise UserInputError("--learning_rate_list/--bsz_list: a value is listed twice")
    if args.do_predict and not args.do_train and not (args.test_checkpoint or args.train_checkpoint):
        raise UserInputError("--do_predict without --do_train needs --test_checkpoint (or --train_checkpoint)")
    return DeltaConfig(args.tune_method, args.adapter_type, args.adapter_size, args.lora_r, args.lora_alpha,
                       args.prefix_length, args.prefix_mlp).validate()


class RunLog:
    """Log lines to the console (above the tqdm bars) and to the run's log file."""

    def __init__(self, path: Path | None = None, console: bool = True):
        self.file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115 (closed in close())
        self.console = console

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        if self.console:
            tqdm.write(line)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


@dataclass
class Decoding:
    """How a task is predicted at validation and test (see ``plan_decoding``)."""

    max_new_tokens: int
    rank_labels: list[str] | None = None  # rank classification over these labels instead of generation
    label_budget: bool = False  # max_new_tokens is the longest label + EOS

    def describe(self) -> str:
        if self.rank_labels:
            shown = ", ".join(self.rank_labels[:5]) + (", ..." if len(self.rank_labels) > 5 else "")
            return f"rank classification over {len(self.rank_labels)} labels ({shown})"
        if self.label_budget:
            return f"generation, max_new_tokens {self.max_new_tokens} (label task: the longest label + EOS)"
        return f"generation, max_new_tokens {self.max_new_tokens}"


def plan_decoding(args: argparse.Namespace, tokenizer, metric: str, examples: list[Example]) -> Decoding:
    """Budget and method of prediction for one task, from its label set (train and dev examples).

    A label task generates at most its longest label + EOS: a row that produces a label (in the label's
    own tokenisation) ends within that budget and keeps its prediction; a row that would go on is cut,
    and it was not going to be a label (see models.seq2seq.generate). Beam search keeps the full budget,
    since its choice among beams can depend on the maximum length.
    """
    labels = label_set(examples, metric)
    if args.rank_classification and labels:
        return Decoding(args.max_output_length, rank_labels=labels)
    if args.max_new_tokens != "auto":
        return Decoding(args.max_new_tokens)
    if not labels or args.num_beams > 1:
        return Decoding(args.max_output_length)
    longest = max(len(tokenizer(label, add_special_tokens=False).input_ids) for label in labels) + 1  # + EOS
    if longest >= args.max_output_length:
        return Decoding(args.max_output_length)
    return Decoding(longest, label_budget=True)


@dataclass
class TaskData:
    name: str
    metric: str
    splits: dict[str, EncodedTask]
    decoding: Decoding | None = None  # None: generation with --max_output_length tokens (callers without a plan)


@dataclass
class RunResult:
    dev: float | None
    test: float | None
    best_step: int | None


def fmt_score(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


@dataclass(frozen=True)
class Distributed:
    """This process's place among data-parallel processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str) -> tuple[Distributed, str]:
    """Join the process group a launcher (``accelerate launch``, ``torchrun``) describes, and pick the device.

    The launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Without it (or with one
    process) nothing is joined. Several processes use one GPU each (NCCL) or the CPU (gloo).
    """
    if device_arg == "auto" and os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes"):
        device_arg = "cpu"  # accelerate launch --cpu
    device = pick_device(device_arg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), device
    rank = int(os.environ["RANK"])
    try:
        is_cuda = torch.device(device).type == "cuda"
    except (RuntimeError, ValueError):
        return Distributed(rank, world), device  # load_backbone reports the bad --device before any collective
    if is_cuda and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"  # one GPU per process
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if is_cuda else "gloo")
    return Distributed(rank, world), device


class Trainer:
    """Holds the backbone with its delta module; runs one (task, lr, bsz) at a time.

    Under several processes (data parallel) every process holds the same module and takes the same
    decisions; each computes its share of every batch and of every evaluation, and only rank 0 writes.
    """

    def __init__(self, args: argparse.Namespace, cfg: DeltaConfig, ddp: Distributed | None = None,
                 device: str | None = None):
        self.args, self.cfg = args, cfg
        self.ddp = ddp or Distributed()
        self.device = torch.device(device or pick_device(args.device))
        self.model, self.tokenizer = load_backbone(args.model, args.tokenizer_path, self.device)
        self.fingerprint = backbone_fingerprint(self.model)
        self.backbone = backbone_name(args.model)
        torch.manual_seed(args.seed)  # same seed on every rank, so every rank starts from the same module
        attach_delta(self.model, cfg)
        self.model.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.init_state = delta_state_dict(self.model)
        self.init_source = "random initialisation"
        if args.train_checkpoint:
            self.init_state, self.init_source = self.load_checkpoint(args.train_checkpoint)
        self.test_state = None
        if args.test_checkpoint:
            self.test_state, _ = self.load_checkpoint(args.test_checkpoint)
        self.use_bf16 = args.bf16 and self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def load_checkpoint(self, path: str) -> tuple[dict[str, torch.Tensor], str]:
        folder = resolve_checkpoint(path)
        tensors, meta = load_delta_checkpoint(folder)
        check_compatible(meta, self.cfg, self.fingerprint, str(folder))
        load_delta_state(self.model, tensors, str(folder))  # validates keys and shapes now, not mid-sweep
        return tensors, str(folder)

    def encode(self, examples: list[Example]) -> EncodedTask:
        return encode_examples(self.tokenizer, examples, self.args.max_input_length, self.args.max_output_length)

    def autocast(self) -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.use_bf16)

    def decoding(self, task: TaskData) -> Decoding:
        return task.decoding or Decoding(self.args.max_output_length)

    def evaluate(self, task: TaskData, split: str, desc: str) -> tuple[float, list[str]]:
        """Score of a split; several processes predict every world-th example each and gather the predictions,
        so every rank scores the same predictions and takes the same best/early-stop decisions."""
        a, d, world = self.args, self.decoding(task), self.ddp.world
        encoded = task.splits[split]
        mine = encoded if world == 1 else encoded.subset(range(self.ddp.rank, len(encoded.inputs), world))
        with self.autocast():
            predictions = predict(self.model, self.tokenizer, mine, a.predict_batch_size, d.max_new_tokens,
                                  a.num_beams, desc=desc if self.ddp.is_main else None, labels=d.rank_labels)
        if world > 1:
            shares: list[list[str] | None] = [None] * world
            dist.all_gather_object(shares, predictions)
            predictions = [""] * len(encoded.inputs)
            for rank, share in enumerate(shares):
                predictions[rank::world] = share
        return score(task.metric, predictions, [list(ex.outputs) for ex in encoded.examples]), predictions

    def backward_share(self, inputs: list[list[int]], labels: list[list[int]]) -> torch.Tensor:
        """Backward on this rank's contiguous share of the global batch, then sum the gradients over ranks.

        The model's loss is the mean over label tokens; weighting each share's mean by its fraction of the
        batch's label tokens makes the sum over ranks the mean over the whole batch, as in one process.
        Returns this share's weighted loss (on device).
        """
        n, world, rank = len(inputs), self.ddp.world, self.ddp.rank
        lo, hi = rank * n // world, (rank + 1) * n // world  # shares differ by at most one example
        if hi > lo:
            batch = to_device(collate(inputs[lo:hi], labels[lo:hi], self.tokenizer.pad_token_id), self.device)
            weight = sum(len(y) for y in labels[lo:hi]) / sum(len(y) for y in labels)  # host ints: no sync
            with self.autocast():
                loss = self.model(**batch).loss * weight
            loss.backward()
        else:  # a batch smaller than the world leaves this rank without examples: it adds zero gradients
            loss = torch.zeros((), device=self.device)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)  # one collective for all delta parameters; on NCCL it is queued, no host sync
        offset = 0
        for p in self.params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return loss.detach()

    def step(self, inputs: list[list[int]], labels: list[list[int]], optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler) -> torch.Tensor:
        """One optimisation step on a global batch; returns its loss (this rank's share) without a host sync.

        Nothing here reads a device value on the host: the batch is copied asynchronously from pinned memory
        (to_device), clip_grad_norm_ keeps the total norm on the device, AdamW keeps its step counters on the
        CPU and LambdaLR sets the learning rate as a python float.
        """
        a = self.args
        if self.ddp.world == 1:
            batch = to_device(collate(inputs, labels, self.tokenizer.pad_token_id), self.device)
            with self.autocast():
                loss = self.model(**batch).loss
            loss.backward()
        else:
            loss = self.backward_share(inputs, labels)
        if a.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, a.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def train(self, task: TaskData, lr: float, bsz: int, log: RunLog, run_dir: Path | None) -> RunResult:
        """Train one run; ``run_dir`` (rank 0 only; None on other ranks) gets the curve and the checkpoint."""
        a = self.args
        load_delta_state(self.model, self.init_state, self.init_source)
        torch.manual_seed(a.seed)
        rng = random.Random(a.seed)
        optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=a.weight_decay)
        warmup = min(a.warmup_steps, a.train_iters)

        def lr_factor(step: int) -> float:  # linear warm-up to lr, then linear decay to 0 at train_iters
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (a.train_iters - step) / max(1, a.train_iters - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        # Every rank draws the same global batches (same seed); each trains on its share of them.
        batches = training_examples(task.splits["train"], bsz, rng)

        log(f"validation: {self.decoding(task).describe()}")
        best_dev, _ = self.evaluate(task, "dev", desc="dev")
        best_step, best_state, stale = 0, delta_state_dict(self.model), 0
        curve = [[0, fmt_score(best_dev), "-"]]
        log(f"step 0 (initialisation from {self.init_source}): dev {task.metric} {best_dev:.4f}")
        self.model.train()
        running_loss = torch.zeros((), device=self.device)
        seen, last_time, last_loss = 0, time.time(), float("nan")
        bar = tqdm(range(1, a.train_iters + 1), desc=f"{task.name} lr={lr:g} bsz={bsz}", leave=False,
                   disable=not self.ddp.is_main)
        for step in bar:
            inputs, labels = next(batches)
            running_loss += self.step(inputs, labels, optimizer, scheduler)  # no host sync; read at log steps
            seen += len(inputs)
            if step % a.log_interval == 0 or step == a.train_iters:
                n = a.log_interval if step % a.log_interval == 0 else step % a.log_interval
                if self.ddp.world > 1:
                    dist.all_reduce(running_loss)  # the shares' weighted losses add up to the batch loss
                last_loss = running_loss.item() / n
                rate = seen / max(time.time() - last_time, 1e-9)
                log(f"step {step}: loss {last_loss:.4f} lr {scheduler.get_last_lr()[0]:.3g} {rate:.1f} examples/s")
                bar.set_postfix(loss=f"{last_loss:.3f}")
                running_loss.zero_()
                seen, last_time = 0, time.time()
            if step % a.valid_interval == 0 or step == a.train_iters:
                dev, _ = self.evaluate(task, "dev", desc="dev")
                curve.append([step, fmt_score(dev), f"{last_loss:.4f}"])
                if dev > best_dev:
                    best_dev, best_step, best_state, stale = dev, step, delta_state_dict(self.model), 0
                    log(f"step {step}: dev {task.metric} {dev:.4f} (new best)")
                else:
                    stale += 1
                    log(f"step {step}: dev {task.metric} {dev:.4f} (best {best_dev:.4f} at step {best_step})")
                    if a.early_stop and stale >= a.early_stop:
                        log(f"early stop: no gain in {stale} validations")
                        break
                self.model.train()
        bar.close()
        self.model.eval()
        if a.save_last:  # the loop always ends on a validation, so `dev` scores this last module
            best_dev, best_step, best_state = dev, step, delta_state_dict(self.model)
        if run_dir is not None:
            write_tsv_atomic(run_dir / "curve.tsv", ["step", "dev", "train_loss"], curve)
            save_delta_checkpoint(run_dir / CHECKPOINT_SUBDIR, best_state, self.cfg, self.backbone,
                                  self.fingerprint, task=task.name, metric=task.metric, score=best_dev,
                                  step=best_step, extra={"lr": lr, "bsz": bsz, "k": a.k, "data_seed": a.data_seed,
                                                         "seed": a.seed, "init": self.init_source})
        load_delta_state(self.model, best_state, "best state")
        test = self.predict(task, run_dir, log) if a.do_predict else None
        return RunResult(best_dev, test, best_step)

    def predict(self, task: TaskData, run_dir: Path | None, log: RunLog) -> float:
        if self.test_state is not None:
            load_delta_state(self.model, self.test_state, self.args.test_checkpoint)
        test_score, predictions = self.evaluate(task, "test", desc="test")
        if run_dir is not None:
            rows = [[ex.input, pred, ex.outputs[0]] for ex, pred in zip(task.splits["test"].examples, predictions)]
            write_tsv_atomic(run_dir / "test_predictions.tsv", ["input", "prediction", "gold"], rows)
        log(f"test {task.metric} {test_score:.4f}")
        return test_score


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
    trainer = Trainer(args, cfg, ddp, device)
    data = {}
    for t in tasks:
        decoding = plan_decoding(args, trainer.tokenizer, metrics[t],
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
