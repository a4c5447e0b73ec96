"""Atomic writes: every file and folder this project writes appears whole or not at all.

Each helper writes under a hidden temporary name in the same folder and renames at the end, so a
reader (or a rerun after SIGKILL) never sees half a file; a crash leaves at most a ``.*.tmp-*`` entry.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from utils.errors import UserInputError


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """A hidden, unique name next to ``path`` (same file system, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:12]}")


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Persist a rename (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


Reads = Mapping[str, "str | Path | Iterable[str | Path] | None"]


def check_output_path(path: Path | str, flag: str, reads: Reads | None = None, writes: Reads | None = None) -> Path:
    """``path`` as an output of a run that reads ``reads`` and writes ``writes`` besides (flag -> path or paths):
    an empty path is refused (it would write into the current folder), and so is an output that is, or lies
    inside, an existing input (it could overwrite what the run reads: a split file, a task folder, a source
    module, the backbone) or another of the run's outputs."""
    if path is None or not str(path).strip():
        raise UserInputError(f"{flag}: expected a path, found an empty string")
    path = Path(path)
    where = Path(os.path.realpath(path))
    for kind, given in (("reads", reads), ("writes", writes)):
        for other_flag, value in (given or {}).items():
            values = [value] if isinstance(value, str | Path) else list(value or [])
            for v in values:
                if v is None or not str(v).strip() or (kind == "reads" and not Path(v).exists()):
                    continue  # not given, or a hub id: nothing on disk to overwrite
                other = Path(os.path.realpath(v))
                if where == other or other in where.parents:
                    relation = "is" if where == other else "lies inside"
                    raise UserInputError(f"{flag} {path}: {relation} {other_flag} {v}, which this run {kind[:-1]}s "
                                         "too; write each output to a place of its own")
    return path


def check_output_folder(path: Path | str, flag: str = "--output_dir", reads: Reads | None = None,
                        writes: Reads | None = None) -> Path:
    """``path`` as a folder this run may create or fill: refused in one line if it is empty, if it or a folder
    above it is a file, or if it is or lies inside an input of ``reads`` or another output of ``writes``
    (``check_output_path``)."""
    path = check_output_path(path, flag, reads, writes)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == path else f" ({p} is a file)"
                raise UserInputError(f"{flag} {path}: not a folder{where}; pass a folder to write into")
            break
    return path


_file_digests: dict[tuple[str, int, int], bytes] = {}


def files_digest(files: Iterable[Path | str]) -> str:
    """A sha256 over the files' names and contents, in the order given (16 hex digits). Each file's own hash is
    remembered per (path, size, mtime), so that a study asking again in one process (every stage, every data seed)
    does not read a backbone's gigabytes twice. A missing file counts as its name alone."""
    digest = hashlib.sha256()
    for f in map(Path, files):
        digest.update(f.name.encode() + b"\0")
        if not f.is_file():
            continue
        st = f.stat()
        key = (str(f), st.st_size, st.st_mtime_ns)
        if key not in _file_digests:
            content = hashlib.sha256()
            with open(f, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    content.update(block)
            _file_digests[key] = content.digest()
        digest.update(_file_digests[key])
    return digest.hexdigest()[:16]


def read_tsv(path: Path | str, columns: list[str], *, exact: bool = False) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a UTF-8 TSV whose header holds ``columns`` (exactly them, with ``exact``).

    The one checked reader: a missing column, a row of the wrong length or bytes that are not UTF-8 are a
    UserInputError naming the file and line.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            header = next(reader, None) or []
            if exact and header != columns:
                raise UserInputError(f"{path}:1: expected columns {columns}, found {header}")
            missing = [c for c in columns if c not in header]
            if missing:
                raise UserInputError(f"{path}:1: missing columns {missing}; expected {columns}")
            rows = []
            for row in reader:
                if len(row) != len(header):
                    raise UserInputError(f"{path}:{reader.line_num}: expected {len(header)} tab-separated fields, "
                                         f"found {len(row)}")
                rows.append((reader.line_num, dict(zip(header, row, strict=True))))
    except UnicodeDecodeError:
        raise UserInputError(f"{path}: expected UTF-8 text") from None
    return rows


def read_table(path: Path | str, columns: list[str]) -> list[list[str]]:
    """Rows of a TSV whose header must be ``columns``, as lists in that order (for rewriting it)."""
    return [[row[c] for c in columns] for _, row in read_tsv(path, columns, exact=True)]


def read_json_object(path: Path | str) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is one line naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserInputError(f"{path}: not a readable JSON file ({str(e).splitlines()[0] if str(e) else e})") from None
    except RecursionError:  # hostile input: thousands of nested brackets
        raise UserInputError(f"{path}: JSON nested too deeply to be a settings file") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def with_umask_mode(path: Path | str) -> None:
    """Give a written file the mode an ordinary ``open`` gives (0666 less the umask): some writers (safetensors,
    temporary files) create 0600 files, which a collaborator sharing the machine could not read."""
    os.chmod(path, 0o666 & ~current_umask())


@contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``path`` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        fsync_file(tmp)
        with_umask_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path | str, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_tsv_atomic(path: Path | str, header: list[str], rows: list[list]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def save_figure_atomic(fig: Any, path: Path | str, **savefig_kwargs: Any) -> None:
    """``fig.savefig`` through a temporary file (the format is taken from ``path``'s suffix)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a hidden temporary folder that becomes ``final`` only if the block completes.

    On any error (or Ctrl-C) the temporary folder is removed; an older ``final`` (kept until now) is
    replaced in two renames.
    """
    with staged_dirs([final]) as (tmp,):
        yield tmp


@contextmanager
def staged_dirs(finals: list[Path]) -> Iterator[list[Path]]:
    """``staged_dir`` for several folders at once (the runs of a group): each temporary folder becomes its
    final folder when the block completes, unless the block removed it (a run that failed: its older
    ``final``, if any, is kept). On any error every temporary folder is removed."""
    temps = []
    try:
        for final in finals:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_sibling(final)
            tmp.mkdir()
            temps.append(tmp)
        yield temps
    except BaseException:
        for tmp in temps:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for tmp, final in zip(temps, finals):
        if tmp.exists():
            _commit_dir(tmp, final)


def _commit_dir(tmp: Path, final: Path) -> None:
    fsync_dir(tmp)
    if final.exists():
        old = temp_sibling(final, "old")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)
