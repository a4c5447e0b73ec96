"""Strict reader for few-shot tasks in CrossFit's layout.

Layout: ``{task_dir}/{task}/{task}_{k}_{seed}_{split}.tsv``; each line is
``input<TAB>output[<TAB>output2 ...]`` (several gold answers allowed).

Every problem with the files is raised as :class:`UserInputError` with a ``path:line:`` prefix, so a
malformed split stops a run at load time with a message the user can act on, rather than surfacing
later as a silently wrong example or a tokenizer crash.
"""

from __future__ import annotations

import difflib
import random
import re
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserInputError

SPLITS: tuple[str, ...] = ("train", "dev", "test")

# Longer lines are almost certainly a broken file (e.g. a missing newline gluing a whole split together).
MAX_LINE_CHARS = 1_000_000


@dataclass(frozen=True)
class Example:
    """One input with all of its gold outputs (at least one, none empty)."""

    input: str
    outputs: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.outputs:
            raise ValueError("an Example needs at least one output")


def split_path(task_dir: str | Path, task: str, k: int, seed: int, split: str) -> Path:
    """Path of one split file; rejects a split name outside SPLITS."""
    if split not in SPLITS:
        raise UserInputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return Path(task_dir) / task / f"{task}_{k}_{seed}_{split}.tsv"


def _split_files(task_folder: Path, task: str) -> dict[tuple[int, int], set[str]]:
    """Map (k, seed) -> splits present in a task folder, from the file names."""
    pattern = re.compile(rf"^{re.escape(task)}_(?P<k>\d+)_(?P<seed>\d+)_(?P<split>{'|'.join(SPLITS)})\.tsv$")
    found: dict[tuple[int, int], set[str]] = {}
    for path in task_folder.glob("*.tsv"):
        match = pattern.match(path.name)
        if match is None or not path.is_file():
            continue
        found.setdefault((int(match["k"]), int(match["seed"])), set()).add(match["split"])
    return found


def _describe_available(task_folder: Path, task: str) -> str:
    """Human-readable list of the (k, seed, splits) a task folder holds, for missing-file errors."""
    found = _split_files(task_folder, task)
    if not found:
        return f"{task_folder} holds no {task}_K_SEED_SPLIT.tsv files"
    parts = []
    for (k, seed), splits in sorted(found.items()):
        ordered = [s for s in SPLITS if s in splits]
        parts.append(f"k={k} seed={seed} ({', '.join(ordered)})")
    return f"available for {task}: " + "; ".join(parts)


# Column names a first line of a TSV exported with a header would hold: read as data, it would be one more example.
HEADER_INPUTS = ("input", "inputs", "text", "sentence", "source", "question", "prompt")
HEADER_OUTPUTS = ("output", "outputs", "label", "labels", "target", "answer", "answers", "completion")


def looks_like_header(line: str) -> bool:
    fields = [f.strip().lower() for f in line.split("\t")]
    return len(fields) >= 2 and fields[0] in HEADER_INPUTS and all(f in HEADER_OUTPUTS for f in fields[1:] if f)


def read_split(path: str | Path) -> list[Example]:
    """Parse one split file strictly.

    CRLF endings and trailing blank lines are tolerated; fields are stripped of surrounding
    whitespace (CrossFit strips each line too). Extra empty answer fields are dropped, but a line
    whose answers are all empty is an error, and so are lone CR line breaks and a header row (each would be
    read as something other than what the file holds).
    """
    path = Path(path)
    if not path.is_file():
        message = f"{path}: split file does not exist"
        if path.parent.is_dir():
            task = path.parent.name
            message += f"; {_describe_available(path.parent, task)}"
        raise UserInputError(message)
    raw_lines = path.read_bytes().split(b"\n")
    # Blank lines at the end (the usual final newline, or an editor's extra one) carry no data.
    while raw_lines and raw_lines[-1].rstrip(b"\r") == b"":
        raw_lines.pop()

    examples: list[Example] = []
    for lineno, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bad = raw[err.start]
            raise UserInputError(
                f"{path}:{lineno}: expected UTF-8 text, found byte 0x{bad:02x} at byte offset {err.start}"
            ) from None
        if line.endswith("\r"):
            line = line[:-1]
        if lineno == 1 and line.startswith("\ufeff"):
            line = line[1:]
        if len(line) > MAX_LINE_CHARS:
            raise UserInputError(
                f"{path}:{lineno}: line has {len(line):,} characters, more than the limit of "
                f"{MAX_LINE_CHARS:,}"
            )
        if "\r" in line:  # lone CRs as line breaks (classic Mac) would glue lines into one example
            raise UserInputError(f"{path}:{lineno}: a carriage return inside a line (CR line endings?); save the "
                                 "file with LF or CRLF line endings")
        if lineno == 1 and looks_like_header(line):
            raise UserInputError(f"{path}:1: looks like a header row ({line.strip()!r}); CrossFit split files have "
                                 "none, every line is an example: remove it")
        if "\t" not in line:
            found = "an empty line" if not line.strip() else "no tab"
            raise UserInputError(f"{path}:{lineno}: expected 'input<TAB>output', found {found}")
        fields = [field.strip() for field in line.split("\t")]
        if not fields[0]:
            raise UserInputError(f"{path}:{lineno}: expected a non-empty input before the first tab")
        outputs = tuple(field for field in fields[1:] if field)
        if not outputs:
            raise UserInputError(f"{path}:{lineno}: expected a non-empty output after the tab")
        examples.append(Example(input=fields[0], outputs=outputs))

    if not examples:
        raise UserInputError(f"{path}: empty split: expected at least one 'input<TAB>output' line")
    return examples


def _require_task_dir(task_dir: str | Path) -> Path:
    root = Path(task_dir)
    if not root.exists():
        raise UserInputError(f"task_dir {root} does not exist")
    if not root.is_dir():
        raise UserInputError(f"task_dir {root} is not a directory")
    return root


def _require_task_folder(task_dir: str | Path, task: str) -> Path:
    """Task folder, or an error that suggests close names (typos like glue_mrpc for glue-mrpc)."""
    root = _require_task_dir(task_dir)
    folder = root / task
    if folder.is_dir():
        return folder
    message = f"task '{task}' not found: {folder} does not exist"
    known = [p.name for p in root.iterdir() if p.is_dir()]
    close = difflib.get_close_matches(task, known, n=3, cutoff=0.6)
    if close:
        message += f"; did you mean {', '.join(close)}?"
    raise UserInputError(message)


def load_task(
    task_dir: str | Path, task: str, k: int, seed: int, splits: tuple[str, ...] | list[str] = SPLITS
) -> dict[str, list[Example]]:
    """Read the requested splits of one task, keyed by split name."""
    _require_task_folder(task_dir, task)
    return {split: read_split(split_path(task_dir, task, k, seed, split)) for split in splits}


def list_tasks(task_dir: str | Path) -> list[str]:
    """Sorted names of the task folders (those holding at least one .tsv file)."""
    root = _require_task_dir(task_dir)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.tsv")))


def available_shots(task_dir: str | Path, task: str) -> list[tuple[int, int]]:
    """Sorted (k, seed) pairs for which the task folder holds at least one split file."""
    folder = _require_task_folder(task_dir, task)
    return sorted(_split_files(folder, task))


def pick_output(example: Example, rng: random.Random) -> str:
    """One gold output drawn at random, so training sees every answer of a multi-answer example."""
    return rng.choice(example.outputs)
