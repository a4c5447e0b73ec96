"""Run folders and result.tsv: finding a checkpoint (a checkpoint folder, a tune.py run or task folder), reading
and updating result.tsv under a file lock, and run folder names."""

from __future__ import annotations

import fcntl
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from models.delta import CONFIG_FILE
from models.formats import checkpoint_format
from utils.errors import UserInputError
from utils.io import read_tsv, write_tsv_atomic

# A run is identified by its first five columns (one row per run folder); ``seed`` is the training seed and
# ``method`` the delta method. Files written before those two columns existed still read: they show "-".
RESULT_COLUMNS = ["task", "k", "data_seed", "lr", "bsz", "seed", "method", "dev", "test", "best_step"]
RESULT_KEY = RESULT_COLUMNS[:5]
LEGACY_RESULT_COLUMNS = [c for c in RESULT_COLUMNS if c not in ("seed", "method")]
CHECKPOINT_SUBDIR = "checkpoint"


def run_dir_name(lr: float, bsz: int, data_seed: int) -> str:
    """A run folder's name; ``seed`` is the data split's seed (CrossFit's ``{task}_{k}_{seed}_*.tsv``), so
    runs on several splits of one task share an output folder without overwriting each other."""
    return f"lr_{lr:g}_bsz_{bsz}_seed_{data_seed}"


def legacy_run_dir_name(lr: float, bsz: int) -> str:
    """The run folder name of older tune.py outputs, which had no seed in it (still found when reading)."""
    return f"lr_{lr:g}_bsz_{bsz}"


def result_key(row: dict[str, str] | list[str]) -> tuple[str, ...]:
    """(task, k, data_seed, lr, bsz) of a result.tsv row, as a dict or a list in RESULT_COLUMNS order."""
    if isinstance(row, dict):
        return tuple(str(row[c]) for c in RESULT_KEY)
    return tuple(row[:len(RESULT_KEY)])


def read_result_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a result.tsv, current or legacy header; a legacy row's seed and method are "-"."""
    try:
        numbered = read_tsv(path, RESULT_COLUMNS, exact=True)
    except UserInputError:
        try:
            numbered = read_tsv(path, LEGACY_RESULT_COLUMNS, exact=True)
        except UserInputError as legacy_error:
            if ":1: expected columns" not in str(legacy_error):
                raise  # a bad row of a legacy file: that message names it
            numbered = read_tsv(path, RESULT_COLUMNS, exact=True)  # the current header's message
        for _, row in numbered:
            row.update(seed="-", method="-")
    return numbered


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
    tune.py run folder (``lr_*_bsz_*_seed_*`` holding ``checkpoint/``) or a tune.py task folder, in which case
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
            lr, bsz = float(row["lr"]), int(row["bsz"])
            for name in (run_dir_name(lr, bsz, int(row["data_seed"])), legacy_run_dir_name(lr, bsz)):
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
