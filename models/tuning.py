"""A tune.py sweep as library code: one typed ``TuneConfig`` in, run folders and one result.tsv out.

For each task and each (learning rate, batch size) of the sweep the ``Trainer`` trains one delta module,
keeps the best (or last) one and predicts on test; without training, a checkpoint's predictions alone.
``tune.py`` translates its flags into a ``TuneConfig``; ``study.py`` builds one per stage and calls
``run_sweep``. ``TuneConfig.to_argv`` gives the same sweep back as tune.py flags, for jobs that run it
in their own process.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch.distributed as dist
from tqdm.auto import tqdm

from dataloader.crossfit import Example, load_task
from dataloader.metrics import metric_for_task
from models.backbone import default_task_dir, quiet_libraries
from models.delta import DeltaConfig, load_delta_state
from models.formats.peft_export import check_destination, check_exportable, export_peft
from models.run_folders import CHECKPOINT_SUBDIR, read_result_tsv, run_dir_name, update_result_tsv
from models.trainer import Distributed, RunLog, TaskData, TrainConfig, Trainer, fmt_score, init_distributed
from task_list import resolve_tasks_in
from utils.errors import UserInputError
from utils.io import check_output_folder, staged_dir, write_text_atomic
from utils.params import config_from, field_defaults, flags_of


@dataclass(kw_only=True)
class TuneConfig(TrainConfig):
    """One sweep: the trainer's settings plus the delta method, the tasks and the (lr, bsz) grid.

    Field names are tune.py's flag names, so a config and a command line translate into each other.
    """

    delta: DeltaConfig
    tasks: list[str] = field(default_factory=lambda: ["SAMPLE_TASKS"])
    task_dir: str = field(default_factory=default_task_dir)
    output_dir: str = "runs/tune"
    learning_rate_list: list[float] = field(default_factory=lambda: [5e-4])
    bsz_list: list[int] = field(default_factory=lambda: [8])
    do_train: bool = False
    overwrite: bool = False
    log_file_only: bool = False  # log lines only to each run's log.txt (for drivers like study.py)
    quiet: bool = False
    export_peft: str = ""  # also write each run's best LoRA module as a PEFT folder: {export_peft}/{task}/{run}

    def train_config(self) -> TrainConfig:
        return config_from(TrainConfig, self)

    def to_argv(self) -> list[str]:
        """tune.py flags that give this config back (flags left at their default are left out)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "delta"}
        return [*flags_of(values, field_defaults(TuneConfig)), "--tune_method", self.delta.method,
                *flags_of(self.delta.sizes())]


def check_config(config: TuneConfig) -> None:
    """Values that no run could use, refused before anything is loaded or written."""
    if not (config.do_train or config.do_predict):
        raise UserInputError("nothing to do: give --do_train and/or --do_predict")
    for lr in config.learning_rate_list:
        if not math.isfinite(lr) or lr <= 0:
            raise UserInputError(f"--learning_rate_list: expected positive finite numbers, found {lr}")
    positive = {"--bsz_list": config.bsz_list, "--train_iters": [config.train_iters],
                "--valid_interval": [config.valid_interval], "--log_interval": [config.log_interval],
                "--predict_batch_size": [config.predict_batch_size], "--k": [config.k],
                "--max_input_length": [config.max_input_length], "--max_output_length": [config.max_output_length],
                "--num_beams": [config.num_beams]}
    for flag, values in positive.items():
        for v in values:
            if v <= 0:
                raise UserInputError(f"{flag}: expected a positive integer, found {v}")
    if config.max_new_tokens != "auto" and (not isinstance(config.max_new_tokens, int) or config.max_new_tokens <= 0):
        raise UserInputError(f"--max_new_tokens: expected auto or a positive integer, found {config.max_new_tokens}")
    zero_or_more = {"--early_stop": config.early_stop}
    if config.warmup_steps is not None:
        zero_or_more["--warmup_steps"] = config.warmup_steps
    for flag, v in zero_or_more.items():
        if v < 0:
            raise UserInputError(f"{flag}: expected zero or more, found {v}")
    if (len(set(config.learning_rate_list)) != len(config.learning_rate_list)
            or len(set(config.bsz_list)) != len(config.bsz_list)):
        raise UserInputError("--learning_rate_list/--bsz_list: a value is listed twice")
    if config.do_train and config.test_checkpoint:
        raise UserInputError("--test_checkpoint with --do_train is ambiguous: predict with the module just trained "
                             "(drop --test_checkpoint) or with the given one (drop --do_train)")
    if config.do_predict and not config.do_train and not (config.test_checkpoint or config.train_checkpoint):
        raise UserInputError("--do_predict without --do_train needs --test_checkpoint (or --train_checkpoint)")
    if config.export_peft:
        if not config.do_train:
            raise UserInputError("--export_peft writes the modules this run trains: it needs --do_train")
        check_exportable(config.delta.method)


@dataclass
class SweepInputs:
    """A config checked against the disk: everything ``run_checked`` needs, before anything is written."""

    config: TuneConfig
    tasks: list[str]
    splits: list[str]
    raw: dict[str, dict[str, list[Example]]]
    metrics: dict[str, str]
    runs: list[tuple[str, float, int]]  # (task, lr, bsz) of the sweep
    output_dir: Path


def check_inputs(config: TuneConfig) -> SweepInputs:
    """Validate the config, the data and the output folder (earlier runs are refused unless overwrite)."""
    check_config(config)
    task_dir, tasks = resolve_tasks_in(config.task_dir, config.tasks)
    splits = (["train", "dev"] if config.do_train else ["dev"]) + (["test"] if config.do_predict else [])
    raw = {t: load_task(task_dir, t, config.k, config.data_seed, splits) for t in tasks}
    metrics = {t: metric_for_task(t, task_dir) for t in tasks}
    output_dir = check_output_folder(config.output_dir)
    runs = [(t, lr, bsz) for t in tasks for lr in config.learning_rate_list for bsz in config.bsz_list]
    if not config.overwrite:
        # Per output, so parallel jobs of one sweep can share the folder: training writes the run folders,
        # prediction alone writes {task}/predict.
        if config.do_train:
            existing, kind = [output_dir / t / run_dir_name(lr, bsz, config.data_seed) for t, lr, bsz in runs], "run"
        else:
            existing, kind = [output_dir / t / "predict" for t in tasks], "prediction"
        existing = [d for d in existing if d.exists()]
        if existing:
            raise UserInputError(f"{existing[0]}: {kind} folder exists (from an earlier run); pass --overwrite to "
                                 "replace it or choose another --output_dir")
    if (output_dir / "result.tsv").is_file():
        read_result_tsv(output_dir / "result.tsv")  # refuse a malformed one now rather than after training
    if config.export_peft:
        export = check_output_folder(config.export_peft, "--export_peft")
        for t, lr, bsz in runs:
            check_destination(export / t / run_dir_name(lr, bsz, config.data_seed), config.overwrite, "--export_peft")
    return SweepInputs(config, tasks, splits, raw, metrics, runs, output_dir)


def run_sweep(config: TuneConfig) -> None:
    """Check everything, then run the sweep (under torchrun: every process takes its share of each batch)."""
    inputs = check_inputs(config)  # everything that can be wrong is checked before the first file is written
    if config.quiet:
        quiet_libraries()
    ddp, device = init_distributed(config.device)
    try:
        run_checked(inputs, ddp, device)
    finally:
        if ddp.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run_checked(inputs: SweepInputs, ddp: Distributed, device: str) -> None:
    """Every run of the sweep (or the predictions of a checkpoint); only rank 0 writes files and logs."""
    config, tasks, splits, raw, metrics, runs, output_dir = (
        inputs.config, inputs.tasks, inputs.splits, inputs.raw, inputs.metrics, inputs.runs, inputs.output_dir)
    cfg = config.delta
    trainer = Trainer(config.train_config(), cfg, ddp, device)
    data = {}
    for t in tasks:
        decoding = trainer.config.plan_decoding(trainer.tokenizer, metrics[t],
                                                [ex for s in ("train", "dev") if s in raw[t] for ex in raw[t][s]])
        data[t] = TaskData(t, metrics[t], {s: trainer.encode(raw[t][s]) for s in splits}, decoding)
    main_rank = ddp.is_main
    if main_rank:
        output_dir.mkdir(parents=True, exist_ok=True)
    say = print if main_rank and not config.log_file_only else (lambda *a, **k: None)
    processes = f"; {ddp.world} processes, each on its share of every batch" if ddp.world > 1 else ""
    say(f"{len(tasks)} task(s), {len(runs) if config.do_train else len(tasks)} run(s): method {cfg.describe()} "
        f"on {trainer.backbone} ({trainer.device}{processes}); output in {output_dir}", flush=True)

    def staged(final: Path):  # rank 0 builds the run folder; other ranks get None and write nothing
        return staged_dir(final) if main_rank else nullcontext(None)

    def run_log(tmp: Path | None) -> RunLog:
        return RunLog(tmp / "log.txt" if tmp else None, console=main_rank and not config.log_file_only)

    if not config.do_train:
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
                update_result_tsv(output_dir, {"task": t, "k": config.k, "data_seed": config.data_seed, "lr": "-",
                                               "bsz": "-", "seed": "-", "method": cfg.method, "dev": fmt_score(dev),
                                               "test": fmt_score(test), "best_step": "-"})
        return

    for t, lr, bsz in tqdm(runs, desc="runs", disable=len(runs) == 1 or not main_rank):
        with staged(output_dir / t / run_dir_name(lr, bsz, config.data_seed)) as tmp:
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
            update_result_tsv(output_dir, {"task": t, "k": config.k, "data_seed": config.data_seed,
                                           "lr": f"{lr:g}", "bsz": bsz, "seed": config.seed, "method": cfg.method,
                                           "dev": fmt_score(result.dev),
                                           "test": fmt_score(result.test), "best_step": result.best_step})
        say(f"{t} lr={lr:g} bsz={bsz}: dev {fmt_score(result.dev)} test {fmt_score(result.test)} "
            f"(best step {result.best_step})", flush=True)
        if main_rank and config.export_peft:
            run = output_dir / t / run_dir_name(lr, bsz, config.data_seed)
            out = export_peft(run / CHECKPOINT_SUBDIR, Path(config.export_peft) / t / run.name,
                              base_model=config.model, overwrite=config.overwrite, flag="--export_peft")
            say(f"{t}: PEFT adapter {out}", flush=True)
