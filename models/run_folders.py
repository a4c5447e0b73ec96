"""Run folders and result.tsv: finding a checkpoint (a checkpoint folder, a tune.py run or task folder), reading
and updating result.tsv under a file lock, and run folder names."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from models.delta import CONFIG_FILE
from models.formats import checkpoint_format
from utils.errors import UserInputError
from utils.io import read_table, read_tsv, write_tsv_atomic

RESULT_COLUMNS = ["task", "k", "data_seed", "lr", "bsz", "dev", "test", "best_step"]
CHECKPOINT_SUBDIR = "checkpoint"


def run_dir_name(lr: float, bsz: int) -> str:
    return f"lr_{lr:g}_bsz_{bsz}"


def read_result_tsv(path: Path) -> list[dict[str, str]]:
    """Rows of a tune.py ``result.tsv``; missing columns, a cut-off row or a non-numeric lr, bsz or dev
    score are a UserInputError naming the file and line (checkpoint lookup does arithmetic on them)."""
    numbered = read_tsv(path, RESULT_COLUMNS)
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
    """The rows of a ``result.tsv`` as lists of strings, after checking its header and row lengths."""
    return read_table(path, RESULT_COLUMNS)


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
    key = [str(row[c]) for c in ("task", "k", "data_seed", "lr", "bsz")]
    with file_lock(output_dir / ".result.tsv.lock"):
        rows = [r for r in result_rows(path) if r[:5] != key] if path.is_file() else []
        rows.append([row[c] for c in RESULT_COLUMNS])
        write_tsv_atomic(path, RESULT_COLUMNS, rows)


def resolve_checkpoint(path: str | Path, task: str | None = None) -> Path:
    """The checkpoint folder that ``path`` stands for.

    ``path`` may be a checkpoint itself, an AdapterHub ``save_adapter`` folder (converted when loaded), a
    tune.py run folder (``lr_*_bsz_*`` holding ``checkpoint/``) or a tune.py task folder, in which case the
    run with the best dev score in the parent's ``result.tsv`` is taken.
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
    candidates: list[tuple[float, Path]] = []
    if result_tsv.is_file():
        for row in read_result_tsv(result_tsv):
            if row["task"] != task or row["lr"] == "-":
                continue
            run = path / run_dir_name(float(row["lr"]), int(row["bsz"])) / CHECKPOINT_SUBDIR
            if (run / CONFIG_FILE).is_file():
                candidates.append((float(row["dev"]), run))
    if not candidates:
        raise UserInputError(
            f"{path}: no delta checkpoint here, and no run of task {task!r} with a checkpoint in {result_tsv}")
    # Best dev score; ties go to the first row written (the first lr/bsz of the sweep).
    best = max(range(len(candidates)), key=lambda i: (candidates[i][0], -i))
    return candidates[best][1]
