"""Run folders and result.tsv: a run's identity (its settings, their hash, its folder's name), the claim a run
holds on its folder while it trains, reading and updating result.tsv under a file lock, and finding a checkpoint
(a checkpoint folder, a tune.py run or task folder)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from models.delta import CONFIG_FILE
from models.formats import checkpoint_format
from models.settings import TuneConfig
from utils.errors import UserInputError
from utils.io import files_digest, read_tsv, write_tsv_atomic

# One row per run folder: ``run`` is the folder's name, which carries the run's whole identity (below), so two
# runs that differ in any setting never share a row or a folder. Files written by older versions (without the
# ``run`` column, or also without ``seed`` and ``method``) still read: their missing columns show "-".
RESULT_COLUMNS = ["task", "k", "data_seed", "lr", "bsz", "seed", "method", "run", "dev", "test", "best_step"]
OLDER_RESULT_COLUMNS = ([c for c in RESULT_COLUMNS if c != "run"],
                        [c for c in RESULT_COLUMNS if c not in ("seed", "method", "run")])
LEGACY_KEY = ("task", "k", "data_seed", "lr", "bsz")  # a row's identity in files without the run column
CHECKPOINT_SUBDIR = "checkpoint"

# What only says where or how a sweep runs, not what a run computes: two runs that differ only in these are the same
# run (a resumed one may differ in them). The sweep's lists are replaced by the run's own task, lr and bsz.
NOT_IDENTITY = ("output_dir", "overwrite", "resume", "quiet", "log_file_only", "group_size", "export_peft", "device",
                "predict_batch_size", "log_interval", "tasks", "learning_rate_list", "bsz_list", "task_dir")


# Checkpoints a run starts from or predicts with: where they lie is not what they are. Their content's hash is part
# of the run's settings (a resumed run checks it); their path is recorded but left out of the folder name's hash.
CHECKPOINT_SETTINGS = ("train_checkpoint", "test_checkpoint")


def run_settings(config: TuneConfig, task: str, lr: float | None = None, bsz: int | None = None) -> dict:
    """What makes one run what it is, as written in its ``result.json`` and hashed into its folder's name (a
    resumed sweep compares these). Without ``lr`` and ``bsz``: a prediction of a checkpoint, no training."""
    values = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in NOT_IDENTITY}
    values["delta"] = config.delta.to_dict()
    values.update(task=task, lr=lr, bsz=bsz)
    for name in CHECKPOINT_SETTINGS:
        if values.get(name):
            values[f"{name}_sha256"] = checkpoint_digest(values[name])
    return json.loads(json.dumps(values, default=str))


def settings_digest(settings: dict) -> str:
    """A short hash of the settings that make a run (checkpoints by content, not path): 8 hex digits, so that
    names stay readable."""
    identity = {k: v for k, v in settings.items() if k not in CHECKPOINT_SETTINGS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


def checkpoint_digest(path: str | Path) -> str:
    """A hash of a checkpoint's tensor files (its metadata may name folders and is left out); "-" where ``path``
    is not a readable checkpoint (the reader that loads it says why, in its own words)."""
    try:
        folder = resolve_checkpoint(path)
    except UserInputError:
        return "-"
    return files_digest(sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()))


def run_dir_name(settings: dict) -> str:
    """A run folder's name: the settings a reader sorts by, written losslessly (``repr`` of the learning rate:
    0.001 and 0.0010000001 differ), then the hash of everything else (method sizes, budget, checkpoint, ...)."""
    s = settings
    if s.get("lr") is None:
        return f"predict_{settings_digest(s)}"
    return (f"lr_{float(s['lr'])!r}_bsz_{s['bsz']}_k_{s['k']}_data_{s['data_seed']}_seed_{s['seed']}_"
            f"{settings_digest(s)}")


def legacy_run_dir_names(lr: float, bsz: int, data_seed: int) -> tuple[str, str]:
    """The run folder names of older tune.py outputs (still found when reading): with the data seed, and without."""
    return f"lr_{lr:g}_bsz_{bsz}_seed_{data_seed}", f"lr_{lr:g}_bsz_{bsz}"


def result_key(row: dict[str, str] | list[str]) -> tuple[str, ...]:
    """A result.tsv row's identity, as a dict or a list in RESULT_COLUMNS order: (task, run), or for a row of an
    older file (no run name) its (task, k, data_seed, lr, bsz)."""
    if not isinstance(row, dict):
        row = dict(zip(RESULT_COLUMNS, row, strict=True))
    if row["run"] != "-":
        return row["task"], row["run"]
    return tuple(str(row[c]) for c in LEGACY_KEY)


def read_result_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a result.tsv, current or older header; the columns an older file lacks are "-"."""
    try:
        return read_tsv(path, RESULT_COLUMNS, exact=True)
    except UserInputError as error:
        current_error = error
    for columns in OLDER_RESULT_COLUMNS:
        try:
            numbered = read_tsv(path, columns, exact=True)
        except UserInputError as older_error:
            if ":1: expected columns" not in str(older_error):
                raise  # a bad row of an older file: that message names it
            continue
        for _, row in numbered:
            for c in RESULT_COLUMNS:
                row.setdefault(c, "-")
        return numbered
    raise current_error  # the current header's message


def read_result_tsv(path: Path) -> list[dict[str, str]]:
    """Rows of a tune.py ``result.tsv``; missing columns, a cut-off row or a non-numeric lr, bsz or dev
    score are a UserInputError naming the file and line (checkpoint lookup does arithmetic on them)."""
    numbered = read_result_rows(path)
    for lineno, row in numbered:
        for column, kind in (("lr", float), ("bsz", int), ("dev", float)):
            if row[column] != "-":
                try:
                    kind(row[column])
                except ValueError:
                    raise UserInputError(f"{path}:{lineno}: {column}: expected a number or '-', "
                                         f"found {row[column]!r}") from None
    return [row for _, row in numbered]


def result_rows(path: Path) -> list[list[str]]:
    """The rows of a ``result.tsv`` as lists in RESULT_COLUMNS order (a legacy file's rows get "-" for the
    columns it lacks), after checking its header and row lengths."""
    return [[row[c] for c in RESULT_COLUMNS] for _, row in read_result_rows(path)]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed): parallel jobs share one result file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_result_tsv(output_dir: Path, row: dict) -> None:
    """Add (or replace) one run's row of ``result.tsv``; safe when several runs write at once."""
    path = output_dir / "result.tsv"
    key = result_key(row)
    with file_lock(output_dir / ".result.tsv.lock"):
        rows = [r for r in result_rows(path) if result_key(r) != key] if path.is_file() else []
        rows.append([str(row[c]) for c in RESULT_COLUMNS])
        write_tsv_atomic(path, RESULT_COLUMNS, rows)


SOURCES_FILE = "sources.tsv"  # in a folder of source modules: task<TAB>folder, for folders not named by task


def source_path(root: str | Path, task: str) -> Path:
    """Where task ``task``'s module lies in a folder of source modules: ``{root}/{task}``, or the folder that
    ``{root}/sources.tsv`` names for it (relative to ``root`` or absolute), e.g. a library of PEFT adapters
    named ``flan_t5_large-{task}``."""
    root = Path(root)
    table = root / SOURCES_FILE
    if not table.is_file():
        return root / task
    mapping: dict[str, str] = {}
    for line, row in read_tsv(table, ["task", "folder"]):
        if row["task"] in mapping:
            raise UserInputError(f"{table}:{line}: task {row['task']!r} is listed twice")
        mapping[row["task"]] = row["folder"]
    if task not in mapping:
        raise UserInputError(f"{table}: no row for task {task!r} (columns task, folder)")
    return root / mapping[task]


def resolve_checkpoint(path: str | Path, task: str | None = None) -> Path:
    """The checkpoint folder that ``path`` stands for.

    ``path`` may be a checkpoint itself, an AdapterHub ``save_adapter`` folder (converted when loaded), a
    tune.py run folder (``lr_*_bsz_*`` holding ``checkpoint/``) or a tune.py task folder, in which case
    the run with the best dev score in the parent's ``result.tsv`` is taken. A task folder holding runs of
    several data splits or delta methods is refused: which one is meant is the caller's choice, not ours.
    """
    path = Path(path)
    if checkpoint_format(path) is not None:
        return path
    if (path / CHECKPOINT_SUBDIR / CONFIG_FILE).is_file():
        return path / CHECKPOINT_SUBDIR
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        raise UserInputError(f"{path}: a torch pickle file, which is never loaded as a checkpoint directly; convert "
                             f"it first: python scripts/convert_legacy_ckpt.py {path} OUTPUT_DIR")
    if not path.is_dir():
        raise UserInputError(f"{path}: checkpoint not found (expected a delta checkpoint or a tune.py output folder)")
    task = task or path.name
    result_tsv = path.parent / "result.tsv"
    candidates: list[tuple[float, Path, tuple[str, str, str]]] = []
    if result_tsv.is_file():
        for row in read_result_tsv(result_tsv):
            if row["task"] != task or row["lr"] == "-":
                continue
            if row["run"] != "-":
                names: tuple[str, ...] = (row["run"],)
            else:
                names = legacy_run_dir_names(float(row["lr"]), int(row["bsz"]), int(row["data_seed"]))
            for name in names:
                run = path / name / CHECKPOINT_SUBDIR
                if (run / CONFIG_FILE).is_file():
                    candidates.append((float(row["dev"]), run, (row["k"], row["data_seed"], row["method"])))
                    break
    if not candidates:
        raise UserInputError(
            f"{path}: no delta checkpoint here, and no run of task {task!r} with a checkpoint in {result_tsv}")
    splits = sorted({c[2] for c in candidates})
    if len(splits) > 1:
        listed = ", ".join(f"k {k} data_seed {s} method {m}" for k, s, m in splits)
        raise UserInputError(f"{path}: runs of {len(splits)} data splits or methods ({listed}); pass the run folder "
                             f"you mean, e.g. {candidates[0][1].parent}")
    # Best dev score; ties go to the first row written (the first lr/bsz of the sweep). A score that is not a
    # number (nan, inf) is unknown, never the best: max() with a NaN would pick whichever came first.
    known = [i for i, c in enumerate(candidates) if math.isfinite(c[0])]
    if not known:
        raise UserInputError(f"{path}: no run of task {task!r} has a finite dev score in {result_tsv}; pass the run "
                             f"folder you mean, e.g. {candidates[0][1].parent}")
    best = max(known, key=lambda i: (candidates[i][0], -i))
    return candidates[best][1]


def claim_path(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.claim")


@contextmanager
def claimed(folders: list[Path]) -> Iterator[None]:
    """Hold an exclusive claim on each run folder for the block: a second process making a run of the same
    identity (same folder) at the same time is refused at once instead of overwriting it.

    A claim is an advisory lock on a hidden ``.{name}.claim`` file beside the folder; the kernel drops it when
    its process dies, so a killed run leaves no stale claim. The file is removed on release, and so are the
    folders made for it that are still empty (a run refused after its claim leaves nothing behind).
    """
    held: list[tuple[Path, int]] = []
    made: list[Path] = []  # folders created here, deepest last
    try:
        for folder in folders:
            missing = [p for p in (folder.parent, *folder.parent.parents) if not p.exists()]
            folder.parent.mkdir(parents=True, exist_ok=True)
            made += reversed(missing)
            path = claim_path(folder)
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise UserInputError(f"{folder}: another process is making this very run now (same settings, "
                                         "same --output_dir); wait for it to finish, or choose another --output_dir"
                                         ) from None
                # The holder before us may have removed the file between our open and our lock: then we hold a
                # lock on a file nobody else can see, and must take the one at the path now.
                try:
                    same = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    held.append((path, fd))
                    break
                os.close(fd)
        yield
    finally:
        for path, fd in held:
            path.unlink(missing_ok=True)  # while still locked: the next claimant sees a fresh file
            os.close(fd)
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:
                pass  # holds a run (or another process's claim): kept
