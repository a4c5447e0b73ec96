"""Tune-all (the study's stage 3): every source's delta module tuned on every target, leave-one-out.

The command line is ``get_similarity/tune_all.py``, whose help says what a run does and writes; this module
is what it and the study call.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dataloader.crossfit import load_task
from dataloader.metrics import metric_for_task
from models.backbone import quiet_libraries
from models.delta import (
    CONFIG_FILE,
    METHODS,
    DeltaConfig,
    check_compatible,
    load_delta_state,
    save_delta_checkpoint,
)
from models.examples import longest_example
from models.formats import load_delta_checkpoint
from models.group import chunks, pick_group_size
from models.pair_settings import PairsConfig, TuneAllConfig
from models.run_folders import resolve_checkpoint, source_path
from models.settings import TrainConfig, default_warmup
from models.trainer import Run, RunLog, TaskData, Trainer
from task_list import resolve_tasks, resolve_tasks_in
from utils.errors import TrainingFailed, UserInputError
from utils.io import check_output_folder
from utils.progress import progress_bar
from utils.ranges import check_ranges

# The training settings a tuned module records in its meta's "extra"; a rerun only reuses a module whose
# settings all match (otherwise the table would silently mix two set-ups).
SETTINGS = ("steps", "lr", "bsz", "warmup_steps", "seed", "k", "data_seed")


# --------------------------------------------------------------------------------------------------
# Sources and tuned modules (shared with dev_all.py)


@dataclass
class Source:
    name: str
    folder: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def leave_one_out(targets: list[str], sources: list[str]) -> list[tuple[str, str]]:
    """(target, source) pairs in target-major order, never a task with itself."""
    pairs = [(t, s) for t in targets for s in sources if s != t]
    if not pairs:
        raise UserInputError("--tasks/--source_tasks: no (target, source) pair left once a target's own "
                             "module is left out; give at least one source other than the target")
    return pairs


def load_sources(root: str | Path, names: list[str], method: str | None) -> tuple[DeltaConfig, dict[str, Source]]:
    """Find and read every source module; all must share one method and sizes, which become the run's config."""
    root = Path(root)
    if not root.is_dir():
        raise UserInputError(f"--source_ckpt_path {root}: folder does not exist")
    sources = {}
    for name in names:
        folder = resolve_checkpoint(source_path(root, name), task=name)
        tensors, meta = load_delta_checkpoint(folder)
        sources[name] = Source(name, folder, tensors, meta)
    first = sources[names[0]]
    cfg = DeltaConfig.from_checkpoint_meta(first.meta)
    if method is not None and cfg.method != method:
        raise UserInputError(f"--tune_method {method}: source module {first.folder} is {cfg.describe()}")
    for src in sources.values():
        if src.meta["method"] != cfg.method or src.meta["sizes"] != cfg.sizes():
            made = DeltaConfig.from_checkpoint_meta(src.meta).describe()
            raise UserInputError(f"source module {src.folder} is {made}, but {first.folder} is {cfg.describe()}; "
                                 "all sources must share one method and sizes")
    return cfg, sources


def check_sources_fit(model: torch.nn.Module, cfg: DeltaConfig, fingerprint: dict[str, int | str],
                      sources: dict[str, Source], allow_other_weights: bool = False,
                      backbone: str | None = None) -> None:
    """Refuse a source made for another backbone, or whose weights do not fit (keys, shapes)."""
    for src in sources.values():
        check_compatible(src.meta, cfg, fingerprint, str(src.folder), allow_other_weights=allow_other_weights,
                         backbone=backbone)
        load_delta_state(model, src.tensors, str(src.folder))


def resolve_pairs(config: PairsConfig) -> tuple[Path, list[str], list[str], list[tuple[str, str]]]:
    """(task folder, targets, sources, (target, source) pairs) of a tune-all or dev-all run, its method checked.
    Sources need a module, not data: any name goes, and a missing module is reported when the sources load."""
    if config.tune_method is not None and config.tune_method not in METHODS:
        raise UserInputError(f"--tune_method: expected one of {', '.join(METHODS)}, found {config.tune_method!r}")
    if config.quiet:
        quiet_libraries()
    task_dir, targets = resolve_tasks_in(config.task_dir, config.tasks)
    sources = resolve_tasks(config.source_tasks, flag="--source_tasks") if config.source_tasks else targets
    return task_dir, targets, sources, leave_one_out(targets, sources)


def is_tuned(folder: Path) -> bool:
    """True if ``folder`` holds a module; refuses a folder that is something else (it is never replaced)."""
    if not folder.exists():
        return False
    if not (folder / CONFIG_FILE).is_file():
        raise UserInputError(f"{folder}: exists but is not a delta checkpoint (no {CONFIG_FILE}); "
                             "remove it or choose another output folder")
    return True


def read_tuned(folder: Path, target: str, source: str) -> dict[str, Any] | None:
    """Meta of the tuned module at ``folder`` (None if absent); refuses a module that is not this pair's."""
    if not is_tuned(folder):
        return None
    _, meta = load_delta_checkpoint(folder)  # also checks the weights file is readable
    extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
    if meta["task"] != target or extra.get("source") != source:
        raise UserInputError(f"{folder}/{CONFIG_FILE}: expected the module tuned on {target!r} from {source!r}, "
                             f"found task={meta['task']!r} source={extra.get('source')!r}")
    return meta


# --------------------------------------------------------------------------------------------------
# Training


def pair_train_config(config: TuneAllConfig) -> TrainConfig:
    """tune.py's run for one pair: train --steps steps, validate once at the end, keep the last module."""
    return TrainConfig(
        model=config.model, tokenizer_path=config.tokenizer_path, device=config.device, bf16=config.bf16,
        k=config.k, data_seed=config.data_seed, seed=config.seed,
        max_input_length=config.max_input_length, max_output_length=config.max_output_length,
        predict_batch_size=config.predict_batch_size, num_beams=config.num_beams,
        train_iters=config.steps, warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, valid_interval=config.steps, log_interval=config.steps,
        early_stop=0, save_last=True, allow_other_backbone=config.allow_other_backbone,
    )



# Long by design: every check comes before the first training step, in the order a user would fix them, then
# one loop over the groups of pairs.
def run_tune_all(config: TuneAllConfig) -> None:
    """Tune every pair not tuned yet; everything that can be wrong is checked before the first step."""
    check_ranges(config)  # every number against the range its field declares (models/pair_settings.py)
    if config.warmup_steps is None:  # the trainer's rule, made explicit: the modules record it
        config = dataclasses.replace(config, warmup_steps=default_warmup(config.steps))
    # Everything that can be wrong with the input is checked before the first file is written.
    task_dir, targets, source_names, pairs = resolve_pairs(config)
    raw = {t: load_task(task_dir, t, config.k, config.data_seed, ["train", "dev"]) for t in targets}
    metrics = {t: metric_for_task(t, task_dir) for t in targets}
    cfg, sources = load_sources(config.source_ckpt_path, source_names, config.tune_method)
    output_dir = check_output_folder(config.output_dir, "--output_dir", {
        "--task_dir": config.task_dir, "--model": config.model, "--tokenizer_path": config.tokenizer_path,
        "--source_ckpt_path": config.source_ckpt_path})
    settings = {"steps": config.steps, "lr": config.learning_rate, "bsz": config.bsz,
                "warmup_steps": config.warmup_steps, "seed": config.seed, "k": config.k, "data_seed": config.data_seed}
    # With --overwrite an existing module is replaced unread (it may be the broken one being redone).
    existing = {(t, s): None if config.overwrite and is_tuned(output_dir / t / s) else
                read_tuned(output_dir / t / s, t, s) for t, s in pairs}

    trainer = Trainer(pair_train_config(config), cfg)  # loads the backbone, once
    check_sources_fit(trainer.model, cfg, trainer.fingerprint, sources, config.allow_other_backbone, config.model)
    for (t, s), meta in existing.items():
        if meta is None:
            continue
        folder = output_dir / t / s
        check_compatible(meta, cfg, trainer.fingerprint, str(folder), allow_other_weights=config.allow_other_backbone)
        for key, want in settings.items():
            if meta["extra"].get(key) != want:
                raise UserInputError(f"{folder}: tuned with {key}={meta['extra'].get(key)!r} but this run asks "
                                     f"{key}={want!r}; pass --overwrite to redo it or choose another --output_dir")
    # The sources of a target form groups of G in a fixed order; a group with any pair left to tune trains
    # whole (the pairs already tuned are trained again but not rewritten), so a resumed run trains every
    # module in the group an uninterrupted run gives it: with dropout on, a module's masks depend on its
    # group, as they depend on the seed.
    data = {t: TaskData(t, metrics[t], {s: trainer.encode(raw[t][s]) for s in ("train", "dev")}) for t in targets}
    size, why = pick_group_size(config.group_size, max(len([s for s in source_names if s != t]) for t in targets),
                                trainer.model.config, trainer.device, config.bsz,
                                longest_example(d.splits["train"] for d in data.values()), training=True)
    groups = [chunk for t in targets for chunk in chunks([(t, s) for s in source_names if s != t], size)
              if any(existing[pair] is None for pair in chunk)]
    todo = [pair for chunk in groups for pair in chunk if existing[pair] is None]

    output_dir.mkdir(parents=True, exist_ok=True)
    done = sum(meta is not None for meta in existing.values())
    print(f"{len(pairs)} pair(s) of {len(targets)} target(s) x {len(source_names)} source(s), {done} already "
          f"tuned, {len(todo)} to tune in {len(groups)} group(s): {cfg.describe()} on {trainer.backbone} "
          f"({trainer.device}), {config.steps} steps each; {why}; output in {output_dir}", flush=True)
    log = RunLog(output_dir / "tune_all.log", console=not config.log_file_only)
    start = time.time()
    failed = []
    try:
        for chunk in progress_bar(groups, desc="groups", disable=not groups):
            group_start = time.time()
            runs = []
            for t, s in chunk:
                log(f"target {t} <- source {s}: {len(raw[t]['train'])} train / {len(raw[t]['dev'])} dev examples")
                runs.append(Run(data[t], config.learning_rate, config.bsz, sources[s].tensors, str(sources[s].folder),
                                None, log))  # the module is saved below; tune.py's run files are not kept
            results = trainer.train_group(runs)
            seconds = time.time() - group_start
            for (t, s), result in zip(chunk, results):
                if existing[(t, s)] is not None:
                    continue  # trained only to keep its group as it was
                if result.failed is not None:
                    failed.append(f"{t} <- {s}: {result.failed}")
                    log(f"target {t} <- source {s}: not saved ({result.failed})")
                    continue
                save_delta_checkpoint(output_dir / t / s, result.state, cfg, trainer.backbone, trainer.fingerprint,
                                      task=t, metric=metrics[t], score=result.dev, step=result.best_step,
                                      extra={"source": s, **settings, "dev": result.dev,
                                             "init": str(sources[s].folder)})
                log(f"target {t} <- source {s}: dev {metrics[t]} {result.dev:.4f} after {config.steps} steps "
                    f"({seconds:.1f}s for its group of {len(chunk)})")
    finally:
        log.close()
    if todo:
        elapsed = time.time() - start
        print(f"tuned {len(todo) - len(failed)} pair(s) in {elapsed:.1f}s ({elapsed / len(todo):.2f}s per pair)",
              flush=True)
    if failed:
        raise TrainingFailed(f"{len(failed)} pair(s) not saved, their training loss is not finite: "
                             + "; ".join(failed))

