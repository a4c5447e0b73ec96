"""A tune.py sweep as library code: one typed ``TuneConfig`` in, run folders and one result.tsv out.

For each task and each (learning rate, batch size) of the sweep the ``Trainer`` trains one delta module,
keeps the best (or last) one and predicts on test; without training, a checkpoint's predictions alone.
``tune.py`` translates its flags into a ``TuneConfig``; ``study.py`` builds one per stage and calls
``run_sweep``. ``TuneConfig.to_argv`` gives the same sweep back as tune.py flags, for jobs that run it
in their own process.
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch.distributed as dist

from dataloader.crossfit import Example, load_task
from dataloader.metrics import metric_for_task
from models.backbone import quiet_libraries
from models.delta import load_delta_state
from models.evaluate import decoding_for
from models.examples import longest_example
from models.formats.peft_export import check_destination, check_exportable, export_peft
from models.group import chunks, pick_group_size
from models.run_folders import (
    CHECKPOINT_SETTINGS,
    CHECKPOINT_SUBDIR,
    claimed,
    read_result_tsv,
    run_dir_name,
    run_settings,
    update_result_tsv,
)
from models.settings import AUTO, TuneConfig
from models.trainer import Distributed, Run, RunLog, TaskData, Trainer, fmt_score, init_distributed
from task_list import resolve_tasks_in
from utils.errors import TrainingFailed, UserInputError
from utils.io import check_output_folder, staged_dir, staged_dirs, write_text_atomic
from utils.params import first_difference
from utils.progress import progress_bar
from utils.ranges import check_ranges


def finished_run(folder: Path, settings: dict) -> bool:
    """Whether ``folder`` holds a finished run of exactly ``settings`` (resume skips it); a run of other settings,
    or one that recorded none, is refused: resuming would put two set-ups under one name."""
    if not folder.exists():
        return False
    try:
        made = json.loads((folder / "result.json").read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError, RecursionError):
        made = None
    if not isinstance(made, dict):
        raise UserInputError(f"{folder}: a run folder without recorded settings (an older or unfinished run); "
                             "pass --overwrite (OVERWRITE=1) to redo it or choose another --output_dir")
    # The checkpoints are compared by content (their *_sha256): the same module moved elsewhere is the same start.
    k = first_difference({n: v for n, v in made.items() if n not in CHECKPOINT_SETTINGS},
                         {n: v for n, v in settings.items() if n not in CHECKPOINT_SETTINGS})
    if k is not None:
        raise UserInputError(f"{folder}: holds a run with {k}={made.get(k)!r}, this sweep asks "
                             f"{k}={settings.get(k)!r}; pass --overwrite (OVERWRITE=1) to replace it or choose "
                             "another --output_dir")
    return True


def check_config(config: TuneConfig) -> None:
    """Values that no run could use, refused before anything is loaded or written."""
    if not (config.do_train or config.do_predict):
        raise UserInputError("nothing to do: give --do_train and/or --do_predict")
    check_ranges(config)  # every number against the range its field declares (models/settings.py)
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
    runs: list[tuple[str, float, int]]  # (task, lr, bsz) of the sweep that are to run
    output_dir: Path
    skipped: list[tuple[str, float, int]] = field(default_factory=list)  # finished earlier (--resume)
    # each run's settings (run_settings), computed once: they name its folder and are written in its result.json;
    # keyed (task, lr, bsz), or (task, None, None) for a prediction without training
    settings: dict[tuple[str, float | None, int | None], dict] = field(default_factory=dict)

    def folder(self, task: str, lr: float | None = None, bsz: int | None = None) -> Path:
        """Where one run (or, without lr and bsz, one prediction) of this sweep is written."""
        return self.output_dir / task / run_dir_name(self.settings[task, lr, bsz])

    def output_folders(self) -> list[Path]:
        """The folders the sweep writes: its run folders, or without training each task's prediction folder."""
        if self.config.do_train:
            return [self.folder(t, lr, bsz) for t, lr, bsz in self.runs]
        return [self.folder(t) for t in self.tasks]


def check_inputs(config: TuneConfig) -> SweepInputs:
    """Validate the config, the data and the output folder (earlier runs are refused unless overwrite)."""
    check_config(config)
    task_dir, tasks = resolve_tasks_in(config.task_dir, config.tasks)
    splits = (["train", "dev"] if config.do_train else ["dev"]) + (["test"] if config.do_predict else [])
    raw = {t: load_task(task_dir, t, config.k, config.data_seed, splits) for t in tasks}
    metrics = {t: metric_for_task(t, task_dir) for t in tasks}
    reads = {"--task_dir": config.task_dir, "--model": config.model, "--tokenizer_path": config.tokenizer_path,
             "--train_checkpoint": config.train_checkpoint, "--test_checkpoint": config.test_checkpoint}
    output_dir = check_output_folder(config.output_dir, "--output_dir", reads)
    runs = [(t, lr, bsz) for t in tasks for lr in config.learning_rate_list for bsz in config.bsz_list]
    keys = runs if config.do_train else [(t, None, None) for t in tasks]
    inputs = SweepInputs(config, tasks, splits, raw, metrics, runs, output_dir,
                         settings={key: run_settings(config, *key) for key in keys})
    if config.resume and config.do_train and not config.overwrite:
        inputs.skipped = [run for run in runs if finished_run(inputs.folder(*run), inputs.settings[run])]
        inputs.runs = [run for run in runs if run not in inputs.skipped]
    refuse_existing(inputs)  # checked again once the folders are claimed (another process may be making one)
    if (output_dir / "result.tsv").is_file():
        read_result_tsv(output_dir / "result.tsv")  # refuse a malformed one now rather than after training
    if config.export_peft:
        export = check_output_folder(config.export_peft, "--export_peft", reads, {"--output_dir": output_dir})
        for t, lr, bsz in inputs.runs:
            check_destination(export / t / inputs.folder(t, lr, bsz).name, config.overwrite, "--export_peft")
    return inputs


def run_folder(config: TuneConfig, task: str, lr: float | None = None, bsz: int | None = None) -> Path:
    """Where one run of the sweep is written; without ``lr`` and ``bsz``, a prediction of a checkpoint (for callers
    that plan a sweep without checking it: ``SweepInputs.folder`` is the same, computed once)."""
    return Path(config.output_dir) / task / run_dir_name(run_settings(config, task, lr, bsz))


def refuse_existing(sweep: SweepInputs) -> None:
    """Without --overwrite, a folder this sweep would write that exists already is refused (per folder, so that
    parallel jobs of one sweep can share the output folder)."""
    if sweep.config.overwrite:
        return
    existing = [d for d in sweep.output_folders() if d.exists()]
    if existing:
        kind = "run" if sweep.config.do_train else "prediction"
        raise UserInputError(f"{existing[0]}: {kind} folder exists (from an earlier run, or one made meanwhile); "
                             "pass --resume to keep it, --overwrite to replace it, or choose another --output_dir")


# What sweeps grouped into one may differ in: everything else is one trainer's configuration.
PER_SWEEP = ("tasks", "output_dir", "train_checkpoint", "learning_rate_list", "bsz_list", "export_peft")


def run_sweep(config: TuneConfig) -> None:
    """Check everything, then run the sweep (under torchrun: every process takes its share of each batch)."""
    run_sweeps([config])


def run_sweeps(configs: list[TuneConfig]) -> None:
    """Several sweeps as one: their runs are trained in groups of ``group_size`` (the study's transfer stage:
    every fused start of a target in one group). The sweeps may differ only in ``PER_SWEEP``; each is
    checked as alone, and all of them before anything is written."""
    if not configs:
        return
    first = configs[0]
    for other in configs[1:]:
        differ = [f.name for f in fields(TuneConfig) if f.name not in PER_SWEEP
                  and getattr(other, f.name) != getattr(first, f.name)]
        if differ:
            raise UserInputError(f"sweeps run as one must share {', '.join(differ)}")
    if len(configs) > 1 and not first.do_train:
        raise UserInputError("sweeps run as one must train (--do_train)")
    inputs = [check_inputs(c) for c in configs]  # everything that can be wrong is checked before writing
    skipped = sum(len(i.skipped) for i in inputs)
    if skipped and not first.log_file_only:
        print(f"{skipped} run(s) finished earlier with the same settings: skipped (--resume)", flush=True)
    if first.do_train and not any(i.runs for i in inputs):
        return
    if first.quiet:
        quiet_libraries()
    ddp, device = init_distributed(first.device)
    try:
        if ddp.is_main:  # only rank 0 writes; it claims every folder first, then checks them again
            with claimed([folder for i in inputs for folder in i.output_folders()]):
                for i in inputs:
                    refuse_existing(i)
                run_checked(inputs, ddp, device)
        else:
            run_checked(inputs, ddp, device)
    finally:
        if ddp.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def sweep_groups(runs: list[tuple], size: int, shared_batches_only: bool) -> list[list[tuple]]:
    """The sweep's runs (sweep, task, lr, bsz) in groups of at most ``size``.

    With ``shared_batches_only`` (``--group_size auto`` on the CPU) a group holds only runs that draw the same
    batches (one task, one batch size), which run under ``Parallel``: on the CPU, ``BatchSplit`` pads every slice
    to the group's longest input and was slower than one run at a time (docs/scale-out.md, bench/grouped.py).
    """
    if not shared_batches_only:
        return chunks(runs, size)
    keys = list(dict.fromkeys((run[1], run[3]) for run in runs))
    return [group for key in keys for group in chunks([run for run in runs if (run[1], run[3]) == key], size)]


# Long by design: the one loop of a sweep (load once, each run trained or predicted, rows written), kept whole
# so that what rank 0 alone does is visible in one place.
def run_checked(sweeps: list[SweepInputs], ddp: Distributed, device: str) -> None:
    """Every run of the sweeps (or the predictions of a checkpoint); only rank 0 writes files and logs."""
    config = sweeps[0].config
    cfg = config.delta
    trainer = Trainer(config.train_config(), cfg, ddp, device)
    raw = {t: sweep.raw[t] for sweep in sweeps for t in sweep.tasks}  # one data set: k, data_seed, task_dir shared
    metrics = {t: sweep.metrics[t] for sweep in sweeps for t in sweep.tasks}
    data = {}
    for t in raw:
        decoding = decoding_for(trainer.config, trainer.tokenizer, metrics[t],
                                                [ex for s in ("train", "dev") if s in raw[t] for ex in raw[t][s]])
        data[t] = TaskData(t, metrics[t], {s: trainer.encode(raw[t][s]) for s in sweeps[0].splits}, decoding)
    main_rank = ddp.is_main
    for sweep in sweeps:
        if main_rank:
            sweep.output_dir.mkdir(parents=True, exist_ok=True)
    say = print if main_rank and not config.log_file_only else (lambda *a, **k: None)
    processes = f"; {ddp.world} processes, each on its share of every batch" if ddp.world > 1 else ""
    runs = [(sweep, t, lr, bsz) for sweep in sweeps for t, lr, bsz in sweep.runs]
    count = len(runs) if config.do_train else len(sweeps[0].tasks)
    length = longest_example(d.splits["train"] if "train" in d.splits else d.splits["dev"] for d in data.values())
    size, why = pick_group_size(1 if ddp.world > 1 else config.group_size, len(runs), trainer.model.config,
                                trainer.device, max(config.bsz_list), length, training=True)
    shared_batches_only = config.group_size == AUTO and trainer.device.type == "cpu"  # see sweep_groups
    if shared_batches_only and size > 1:
        why += "; on the CPU only runs that share their batches (one task and batch size) are grouped"
    outputs = ", ".join(str(s.output_dir) for s in sweeps)
    say(f"{len(raw)} task(s), {count} run(s): method {cfg.describe()} on {trainer.backbone} "
        f"({trainer.device}{processes}); {why}; output in {outputs}", flush=True)

    def run_log(tmp: Path | None) -> RunLog:
        return RunLog(tmp / "log.txt" if tmp else None, console=main_rank and not config.log_file_only)

    if not config.do_train:
        predict_only(sweeps[0], trainer, data, run_log, main_rank)
        return

    starts = {}  # each sweep's starting module: its --train_checkpoint, else the trainer's random one
    for sweep in sweeps:
        path = sweep.config.train_checkpoint
        starts[id(sweep)] = trainer.load_checkpoint(path) if path else (trainer.init_state, trainer.init_source)

    failed = []
    groups = sweep_groups(runs, size, shared_batches_only)
    bar = progress_bar(groups, desc="groups" if size > 1 else "runs", disable=len(runs) == 1 or not main_rank)
    for group in bar:
        finals = [sweep.folder(t, lr, bsz) for sweep, t, lr, bsz in group]
        with (staged_dirs(finals) if main_rank else nullcontext([None] * len(group))) as temps:
            logs = [run_log(tmp) for tmp in temps]
            try:
                members = []
                for (sweep, t, lr, bsz), log, tmp in zip(group, logs, temps):
                    log(f"task {t} ({metrics[t]}), {len(raw[t]['train'])} train / {len(raw[t]['dev'])} dev "
                        f"examples, lr {lr:g}, bsz {bsz}, {cfg.describe()}")
                    members.append(Run(data[t], lr, bsz, *starts[id(sweep)], tmp, log))
                results = trainer.train_group(members)
            finally:
                for log in logs:
                    log.close()
            for (sweep, t, lr, bsz), tmp, result in zip(group, temps, results):
                if result.failed is not None:
                    failed.append(f"{t} lr={lr:g} bsz={bsz} ({sweep.output_dir}): {result.failed}")
                    if tmp is not None:
                        shutil.rmtree(tmp)  # not committed: an earlier run folder stays as it was
                elif tmp is not None:
                    write_text_atomic(tmp / "result.json", json.dumps(
                        {"task": t, "lr": lr, "bsz": bsz, "dev": result.dev, "test": result.test,
                         "best_step": result.best_step,
                         "settings": sweep.settings[t, lr, bsz]}))
        for (sweep, t, lr, bsz), result in zip(group, results):
            if result.failed is not None:
                say(f"{t} lr={lr:g} bsz={bsz}: not saved ({result.failed})", flush=True)
                continue
            if main_rank:
                update_result_tsv(sweep.output_dir, {
                    "task": t, "k": config.k, "data_seed": config.data_seed, "lr": repr(lr), "bsz": bsz,
                    "seed": config.seed, "method": cfg.method, "run": sweep.folder(t, lr, bsz).name,
                    "dev": fmt_score(result.dev),
                    "test": fmt_score(result.test), "best_step": result.best_step})
            say(f"{t} lr={lr:g} bsz={bsz}: dev {fmt_score(result.dev)} test {fmt_score(result.test)} "
                f"(best step {result.best_step})", flush=True)
            if main_rank and sweep.config.export_peft:
                run = sweep.folder(t, lr, bsz)
                out = export_peft(run / CHECKPOINT_SUBDIR, Path(sweep.config.export_peft) / t / run.name,
                                  base_model=config.model, overwrite=config.overwrite, flag="--export_peft")
                say(f"{t}: PEFT adapter {out}", flush=True)
    if failed:
        raise TrainingFailed(f"{len(failed)} run(s) not saved, their training loss is not finite: " + "; ".join(failed))


def predict_only(sweep: SweepInputs, trainer: Trainer, data: dict[str, TaskData], run_log, main_rank: bool) -> None:
    """Without training: each task's dev and test scores of the given checkpoint, in ``{task}/predict_{hash}``."""
    config, cfg = sweep.config, sweep.config.delta
    if trainer.test_state is None:  # --train_checkpoint only: predict with it
        trainer.test_state = trainer.init_state
    for t in sweep.tasks:
        folder = sweep.folder(t)
        with staged_dir(folder) if main_rank else nullcontext(None) as tmp:
            log = run_log(tmp)
            load_delta_state(trainer.model, trainer.test_state, "test checkpoint")
            log(f"{t}: {data[t].decoding.describe()}")
            dev, _ = trainer.evaluate(data[t], "dev", desc="dev")
            log(f"{t}: dev {data[t].metric} {dev:.4f}")
            test = trainer.predict(data[t], tmp, log)
            log.close()
        if main_rank:
            update_result_tsv(sweep.output_dir, {"task": t, "k": config.k, "data_seed": config.data_seed, "lr": "-",
                                                 "bsz": "-", "seed": "-", "method": cfg.method, "run": folder.name,
                                                 "dev": fmt_score(dev),
                                                 "test": fmt_score(test), "best_step": "-"})
