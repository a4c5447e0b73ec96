"""The trainer: one delta module on a frozen backbone, trained, validated and saved one run at a time.

``Trainer`` holds the backbone and its delta module and runs one (task, learning rate, batch size) at a
time: AdamW with linear warm-up and decay, validation by the one evaluator (``models.seq2seq.predict`` and
the task's metric) every ``valid_interval`` steps, the best (or last) module kept, early stopping, test
predictions. Everything it needs is in a ``TrainConfig``; ``tune.py`` translates its flags into one, and
tune-all builds its own. ``TrainConfig``'s defaults are tune.py's defaults.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dataloader.crossfit import Example
from models.backbone import DEFAULT_MODEL_DIR, backbone_name, load_backbone, pick_device
from models.delta import (
    DeltaConfig,
    attach_delta,
    backbone_fingerprint,
    check_compatible,
    delta_state_dict,
    load_delta_state,
    save_delta_checkpoint,
)
from models.evaluate import Decoding, autocast, plan_decoding, predict_split, score_predictions
from models.formats import load_delta_checkpoint
from models.run_folders import CHECKPOINT_SUBDIR, resolve_checkpoint
from models.seq2seq import EncodedTask, collate, encode_examples, to_device, training_examples
from utils.io import write_tsv_atomic
from utils.params import config_from


def default_warmup(train_iters: int) -> int:
    """Warm-up steps when none is given: the first tenth of training. tune.py, tune-all, the bash sweeps and
    the study all use this one rule, so their defaults cannot drift apart."""
    return train_iters // 10


@dataclass
class TrainConfig:
    """Everything a run needs besides the delta method and the data; the defaults are tune.py's."""

    # backbone and device
    model: str = str(DEFAULT_MODEL_DIR)
    tokenizer_path: str | None = None
    device: str = "auto"
    bf16: bool = False
    allow_other_backbone: bool = False  # modules from a same-shaped backbone with other weights
    # initialisation and prediction
    seed: int = 42
    train_checkpoint: str | None = None
    test_checkpoint: str | None = None
    do_predict: bool = False
    # data (recorded in the checkpoint's meta) and encoding
    k: int = 16
    data_seed: int = 100
    max_input_length: int = 256
    max_output_length: int = 32
    # decoding at validation and test
    predict_batch_size: int = 64
    num_beams: int = 1
    max_new_tokens: int | str = "auto"
    rank_classification: bool = False
    # optimisation and selection
    train_iters: int = 1000
    warmup_steps: int | None = None  # None: a tenth of train_iters (default_warmup)
    valid_interval: int = 100
    log_interval: int = 20
    early_stop: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_last: bool = False

    def plan_decoding(self, tokenizer, metric: str, examples: list[Example]) -> Decoding:
        """How a task with these train and dev ``examples`` is predicted under this config."""
        return plan_decoding(tokenizer, metric, examples, self.max_output_length, self.max_new_tokens,
                             self.num_beams, self.rank_classification)

    @classmethod
    def from_values(cls, values: Any) -> TrainConfig:
        """The fields of this config taken from any object with those attributes (e.g. parsed flags)."""
        return config_from(cls, values)


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

    def __init__(self, config: TrainConfig, cfg: DeltaConfig, ddp: Distributed | None = None,
                 device: str | None = None):
        self.config, self.cfg = config, cfg
        args = config
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
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def load_checkpoint(self, path: str) -> tuple[dict[str, torch.Tensor], str]:
        folder = resolve_checkpoint(path)
        tensors, meta = load_delta_checkpoint(folder)
        check_compatible(meta, self.cfg, self.fingerprint, str(folder),
                         allow_other_weights=self.config.allow_other_backbone, backbone=self.backbone)
        load_delta_state(self.model, tensors, str(folder))  # validates keys and shapes now, not mid-sweep
        return tensors, str(folder)

    def encode(self, examples: list[Example]) -> EncodedTask:
        return encode_examples(self.tokenizer, examples, self.config.max_input_length, self.config.max_output_length)

    def decoding(self, task: TaskData) -> Decoding:
        return task.decoding or Decoding(self.config.max_output_length)

    def evaluate(self, task: TaskData, split: str, desc: str) -> tuple[float, list[str]]:
        """Score of a split; several processes predict every world-th example each and gather the predictions,
        so every rank scores the same predictions and takes the same best/early-stop decisions."""
        a, d, world = self.config, self.decoding(task), self.ddp.world
        encoded = task.splits[split]
        mine = encoded if world == 1 else encoded.subset(range(self.ddp.rank, len(encoded.inputs), world))
        predictions = predict_split(self.model, self.tokenizer, mine, d, a.predict_batch_size, a.num_beams,
                                    a.bf16, desc=desc if self.ddp.is_main else None)
        if world > 1:
            shares: list[list[str] | None] = [None] * world
            dist.all_gather_object(shares, predictions)
            predictions = [""] * len(encoded.inputs)
            for rank, share in enumerate(shares):
                predictions[rank::world] = share
        return score_predictions(task.metric, predictions, encoded), predictions

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
            with autocast(self.device, self.config.bf16):
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
        a = self.config
        if self.ddp.world == 1:
            batch = to_device(collate(inputs, labels, self.tokenizer.pad_token_id), self.device)
            with autocast(self.device, self.config.bf16):
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
        a = self.config
        load_delta_state(self.model, self.init_state, self.init_source)
        torch.manual_seed(a.seed)
        rng = random.Random(a.seed)
        optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=a.weight_decay)
        warmup = min(default_warmup(a.train_iters) if a.warmup_steps is None else a.warmup_steps, a.train_iters)

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
            load_delta_state(self.model, self.test_state, self.config.test_checkpoint)
        test_score, predictions = self.evaluate(task, "test", desc="test")
        if run_dir is not None:
            rows = [[ex.input, pred, ex.outputs[0]] for ex, pred in zip(task.splits["test"].examples, predictions)]
            write_tsv_atomic(run_dir / "test_predictions.tsv", ["input", "prediction", "gold"], rows)
        log(f"test {task.metric} {test_score:.4f}")
        return test_score
