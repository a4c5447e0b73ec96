"""The trainer: delta modules on a frozen backbone, trained, validated and saved, alone or in groups.

``Trainer`` holds the backbone and its delta module. ``train`` runs one (task, learning rate, batch size):
AdamW with linear warm-up and decay, validation by the one evaluator (``models.examples.predict`` and the
task's metric) every ``valid_interval`` steps, the best (or last) module kept, early stopping, test
predictions. ``train_group`` runs several such runs at once, one module per slot of the backbone
(models/group.py), each exactly as it would run alone. Everything it needs is in a ``TrainConfig``;
``tune.py`` translates its flags into one, and tune-all builds its own. ``TrainConfig``'s defaults are
tune.py's defaults.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from dataloader.crossfit import Example
from models.backbone import backbone_name, load_backbone, pick_device
from models.backbones import IGNORE_INDEX, family_of
from models.delta import (
    DeltaConfig,
    attach_delta,
    backbone_fingerprint,
    check_compatible,
    delta_state_dict,
    load_delta_state,
    save_delta_checkpoint,
)
from models.evaluate import Decoding, autocast, predict_group, predict_split, score_predictions
from models.examples import EncodedTask, collate, encode_examples, to_device, training_examples
from models.formats import load_delta_checkpoint
from models.group import activate, channel_rows, ensure_slots, load_slot_state, slot_params, slot_state
from models.methods import DELTA_NAME
from models.run_folders import CHECKPOINT_SUBDIR, resolve_checkpoint
from models.settings import TrainConfig, default_warmup
from utils.errors import UserInputError
from utils.io import write_tsv_atomic
from utils.progress import progress_bar, say

Batch = tuple[list[list[int]], list[list[int]]]  # (input ids, label ids) of a batch's examples


class RunLog:
    """Log lines to the console (above the tqdm bars) and to the run's log file."""

    def __init__(self, path: Path | None = None, console: bool = True):
        self.file = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115 (closed in close())
        self.console = console

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        if self.console:
            say(line)
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
    failed: str | None = None  # why the run was dropped (a non-finite training loss); None: it trained
    state: dict[str, torch.Tensor] | None = None  # the module kept (best, or last with save_last)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean training loss) when read


@dataclass
class Run:
    """One module to train: its task, learning rate and batch size, its start, and where it goes."""

    task: TaskData
    lr: float
    bsz: int
    init_state: dict[str, torch.Tensor]
    init_source: str
    run_dir: Path | None  # None: nothing written (other data-parallel ranks, callers that save themselves)
    log: RunLog


@dataclass
class Member:
    """A run while its group trains: its slot, optimiser, batches and selection state."""

    run: Run
    slot: str
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Iterator[Batch]
    running_loss: torch.Tensor
    last_loss: float = float("nan")
    dev: float = float("nan")
    last_step: int = 0
    best_dev: float = float("nan")
    best_step: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    last_state: dict[str, torch.Tensor] | None = None
    stale: int = 0
    stopped: bool = False
    failed: str | None = None
    test: float | None = None
    curve: list[list] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return not self.stopped and self.failed is None


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
        self.family = family_of(self.model)
        self.backbone = backbone_name(args.model)
        torch.manual_seed(args.seed)  # same seed on every rank, so every rank starts from the same module
        attach_delta(self.model, cfg)
        self.model.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.init_state = delta_state_dict(self.model)
        self.init_source = "random initialisation"
        if args.train_checkpoint:
            self.init_state, self.init_source = self.load_checkpoint(args.train_checkpoint)
        self.active_setup: tuple = ((DELTA_NAME,), None)  # attach_delta leaves the module active alone
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
            batch = collate(self.model, inputs[lo:hi], labels[lo:hi], self.tokenizer.pad_token_id)
            batch = to_device(batch, self.device)
            weight = sum(len(y) for y in labels[lo:hi]) / sum(len(y) for y in labels)  # host ints: no sync
            with autocast(self.device, self.config.bf16):
                loss = self.family.answer_loss(self.model, batch) * weight
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
            batch = to_device(collate(self.model, inputs, labels, self.tokenizer.pad_token_id), self.device)
            with autocast(self.device, self.config.bf16):
                loss = self.family.answer_loss(self.model, batch)
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
        """Train one run from ``init_state``; ``run_dir`` (rank 0 only; None on other ranks) gets the curve
        and the checkpoint."""
        return self.train_group([Run(task, lr, bsz, self.init_state, self.init_source, run_dir, log)])[0]

    def use(self, slots: list[str], batch_sizes: list[int] | None = None) -> None:
        """Activate ``slots`` (models/group.py) unless they are active already (it costs a walk of the model)."""
        setup = (tuple(slots), None if batch_sizes is None else tuple(batch_sizes))
        if setup != self.active_setup:
            activate(self.model, slots, batch_sizes)
            self.active_setup = setup

    # Long by design: the training loop, one readable loop as in nanoGPT (step, validate, keep the best, stop).
    def train_group(self, runs: list[Run]) -> list[RunResult]:
        """Train several runs at once, each in its own slot, exactly as each would train alone.

        Every run keeps its own AdamW state and schedule, its own gradient clipping (the norm of its own
        gradient), its own validations, best module and early stopping; a run that stops leaves the group
        and the others go on. A step sums the runs' mean losses: as the modules share no parameter, each
        gets its single-run gradient. The runs' batches come from one forward pass: ``Parallel`` when they
        are the same batch (same training split, batch size and seed), else ``BatchSplit``. A run whose
        training loss stops being finite is dropped with the reason in its result; the others go on.
        With one run this is the single-run loop (and data-parallel processes work as before).
        """
        a = self.config
        if len(runs) > 1 and self.ddp.world > 1:
            raise UserInputError("a group of modules (--group_size > 1) cannot run under several data-parallel "
                                 "processes: pass --group_size 1")
        slots = ensure_slots(self.model, self.cfg, len(runs)) if len(runs) > 1 else [DELTA_NAME]
        for run, slot in zip(runs, slots):
            load_slot_state(self.model, slot, run.init_state, run.init_source)
        torch.manual_seed(a.seed)
        warmup = min(default_warmup(a.train_iters) if a.warmup_steps is None else a.warmup_steps, a.train_iters)

        def lr_factor(step: int) -> float:  # linear warm-up to lr, then linear decay to 0 at train_iters
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (a.train_iters - step) / max(1, a.train_iters - warmup))

        members = []
        for run, slot in zip(runs, slots):
            params = self.params if slot == DELTA_NAME else list(slot_params(self.model, slot).values())
            optimizer = torch.optim.AdamW(params, lr=run.lr, weight_decay=a.weight_decay)
            # Every run (and every data-parallel rank) draws the batches it would draw alone.
            members.append(Member(run, slot, params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor),
                                  training_examples(run.task.splits["train"], run.bsz, random.Random(a.seed)),
                                  torch.zeros((), device=self.device)))

        for m in members:
            m.run.log(f"validation: {self.decoding(m.run.task).describe()}")
        for m, (dev, _) in zip(members, self.evaluate_members(members, "dev")):
            m.best_dev = m.dev = dev
            m.best_state = slot_state(self.model, m.slot)
            m.curve.append([0, fmt_score(dev), "-"])
            m.run.log(f"step 0 (initialisation from {m.run.init_source}): dev {m.run.task.metric} {dev:.4f}")
        self.model.train()
        seen, last_time = 0, time.time()
        first = runs[0]
        label = f"{first.task.name} lr={first.lr:g} bsz={first.bsz}" if len(runs) == 1 else f"{len(runs)} modules"
        bar = progress_bar(range(1, a.train_iters + 1), desc=label, leave=False, disable=not self.ddp.is_main)
        for step in bar:
            live = [m for m in members if m.live]
            if not live:
                break
            draws = [next(m.batches) for m in live]
            self.group_step(live, draws)  # no host sync; losses are read at log steps
            seen += len(draws[0][0])
            if step % a.log_interval == 0 or step == a.train_iters:
                n = a.log_interval if step % a.log_interval == 0 else step % a.log_interval
                if self.ddp.world > 1:
                    dist.all_reduce(live[0].running_loss)  # the shares' weighted losses add up to the batch loss
                values = torch.stack([m.running_loss for m in live]).tolist()  # one sync for the group
                rate = seen / max(time.time() - last_time, 1e-9)
                for m, total in zip(live, values):
                    m.last_loss = total / n
                    m.running_loss.zero_()
                    if not math.isfinite(m.last_loss):
                        m.failed = f"training loss {m.last_loss} at step {step}"
                        m.run.log(f"step {step}: loss {m.last_loss}: the module is dropped")
                        continue
                    m.losses.append((step, m.last_loss))
                    lr = m.scheduler.get_last_lr()[0]
                    m.run.log(f"step {step}: loss {m.last_loss:.4f} lr {lr:.3g} {rate:.1f} examples/s")
                if len(runs) == 1:
                    bar.set_postfix(loss=f"{live[0].last_loss:.3f}")
                seen, last_time = 0, time.time()
            if step % a.valid_interval == 0 or step == a.train_iters:
                live = [m for m in members if m.live]
                for m, (dev, _) in zip(live, self.evaluate_members(live, "dev")):
                    m.dev, m.last_step = dev, step
                    m.curve.append([step, fmt_score(dev), f"{m.last_loss:.4f}"])
                    metric = m.run.task.metric
                    if dev > m.best_dev:
                        m.best_dev, m.best_step, m.best_state, m.stale = dev, step, slot_state(self.model, m.slot), 0
                        m.run.log(f"step {step}: dev {metric} {dev:.4f} (new best)")
                    else:
                        m.stale += 1
                        m.run.log(f"step {step}: dev {metric} {dev:.4f} (best {m.best_dev:.4f} at step {m.best_step})")
                        if a.early_stop and m.stale >= a.early_stop:
                            m.run.log(f"early stop: no gain in {m.stale} validations")
                            m.stopped = True
                    if a.save_last and not m.live:  # its slot is not trained any further, but keep a copy
                        m.last_state = slot_state(self.model, m.slot)
                self.model.train()
        bar.close()
        self.model.eval()
        kept = [m for m in members if m.failed is None]
        for m in kept:
            if a.save_last:  # the loop always ends on a validation, so `dev` scores this last module
                last = m.last_state if m.last_state is not None else slot_state(self.model, m.slot)
                m.best_dev, m.best_step, m.best_state = m.dev, m.last_step, last
            run = m.run
            if run.run_dir is not None:
                write_tsv_atomic(run.run_dir / "curve.tsv", ["step", "dev", "train_loss"], m.curve)
                save_delta_checkpoint(run.run_dir / CHECKPOINT_SUBDIR, m.best_state, self.cfg, self.backbone,
                                      self.fingerprint, task=run.task.name, metric=run.task.metric, score=m.best_dev,
                                      step=m.best_step, extra={"lr": run.lr, "bsz": run.bsz, "k": a.k,
                                                               "data_seed": a.data_seed, "seed": a.seed,
                                                               "init": run.init_source})
            load_slot_state(self.model, m.slot, m.best_state, "best state")
        if a.do_predict and kept:
            for m, (score, predictions) in zip(kept, self.evaluate_members(kept, "test")):
                m.test = score
                write_test_predictions(m.run.task, m.run.run_dir, predictions, score, m.run.log)
        self.use([DELTA_NAME])
        return [RunResult(m.best_dev, m.test, m.best_step, state=m.best_state, losses=m.losses) if m.failed is None
                else RunResult(None, None, None, failed=m.failed, losses=m.losses) for m in members]

    def group_step(self, live: list[Member], draws: list[Batch]) -> None:
        """One optimisation step of every live run on its own batch (``draws``, in ``live``'s order)."""
        a = self.config
        if len(live) == 1 and live[0].slot == DELTA_NAME:  # the single-run step (data parallel included)
            self.use([DELTA_NAME])
            m = live[0]
            m.running_loss += self.step(*draws[0], m.optimizer, m.scheduler)
            return
        losses = self.group_losses([m.slot for m in live], draws)
        torch.stack(losses).sum().backward()
        for m, loss in zip(live, losses):
            if a.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(m.params, a.max_grad_norm)  # this run's own norm
            m.optimizer.step()
            m.scheduler.step()
            m.optimizer.zero_grad(set_to_none=True)
            m.running_loss += loss.detach()

    def group_losses(self, slots: list[str], draws: list[Batch]) -> list[torch.Tensor]:
        """Each slot's mean token loss on its own batch, from one forward pass (Parallel or BatchSplit)."""
        # A family without Parallel feeds a shared batch once per slot, as draws that happen to be equal.
        shared = all(d == draws[0] for d in draws[1:]) and self.family.parallel_composition
        if shared:
            inputs, labels = draws[0]
            self.use(slots)
        else:
            inputs = [x for d in draws for x in d[0]]
            labels = [y for d in draws for y in d[1]]
            self.use(slots, [len(d[0]) for d in draws])
        batch = to_device(collate(self.model, inputs, labels, self.tokenizer.pad_token_id), self.device)
        targets = batch["labels"]
        with autocast(self.device, self.config.bf16):
            logits = self.family.answer_logits(self.model, batch)
            rows = channel_rows(logits, len(slots)) if shared else logits.split([len(d[0]) for d in draws])
            gold = [targets] * len(slots) if shared else targets.split([len(d[0]) for d in draws])
            return [torch.nn.functional.cross_entropy(r.reshape(-1, r.shape[-1]), y.reshape(-1),
                                                      ignore_index=IGNORE_INDEX) for r, y in zip(rows, gold)]

    def evaluate_members(self, members: list[Member], split: str) -> list[tuple[float, list[str]]]:
        """Score and predictions of every member on its task's ``split``; members sharing a task share the
        forward passes (``models.evaluate.predict_group``)."""
        a = self.config
        self.use([DELTA_NAME])
        if len(members) == 1 and members[0].slot == DELTA_NAME:
            return [self.evaluate(members[0].run.task, split, desc=split)]
        by_task: dict[int, list[int]] = {}
        for i, m in enumerate(members):
            by_task.setdefault(id(m.run.task), []).append(i)
        results: list[tuple[float, list[str]]] = [(0.0, [])] * len(members)
        for indices in by_task.values():
            task = members[indices[0]].run.task
            encoded = task.splits[split]
            predictions = predict_group(self.model, self.tokenizer, encoded, self.decoding(task), a.predict_batch_size,
                                        [members[i].slot for i in indices], a.num_beams, a.bf16,
                                        desc=split if self.ddp.is_main else None)
            for i, p in zip(indices, predictions):
                results[i] = (score_predictions(task.metric, p, encoded), p)
        return results

    def predict(self, task: TaskData, run_dir: Path | None, log: RunLog) -> float:
        if self.test_state is not None:
            load_delta_state(self.model, self.test_state, self.config.test_checkpoint)
        test_score, predictions = self.evaluate(task, "test", desc="test")
        write_test_predictions(task, run_dir, predictions, test_score, log)
        return test_score


def write_test_predictions(task: TaskData, run_dir: Path | None, predictions: list[str], score: float,
                           log: RunLog) -> None:
    """A run's test predictions beside its checkpoint (rank 0: ``run_dir``), and the score in its log."""
    if run_dir is not None:
        rows = [[ex.input, pred, ex.outputs[0]] for ex, pred in zip(task.splits["test"].examples, predictions)]
        write_tsv_atomic(run_dir / "test_predictions.tsv", ["input", "prediction", "gold"], rows)
    log(f"test {task.metric} {score:.4f}")
