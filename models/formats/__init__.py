"""Checkpoint formats: the one reader of delta modules on disk, whatever wrote them.

Each format is one registration in ``FORMATS``: how to recognise a folder of it, how to read it as this
project's ``(tensors, meta)``, and how to read only its names and shapes. Every place that reads a checkpoint
(tune.py, the similarity metrics, the fusion scripts, importance, the converter) goes through
``load_delta_checkpoint`` or ``inspect_delta_checkpoint``. To add a format, write its reader in a module of
this package (or ``models/legacy.py`` for pickles) and add one ``CheckpointFormat`` line below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.formats.native import check_tensors, inspect_native, is_native_folder, read_native
from models.formats.peft import is_peft_folder, read_peft_folder
from models.legacy import is_adapterhub_folder, read_adapterhub_folder
from utils.errors import UserInputError

Tensors = dict[str, torch.Tensor]
Shapes = dict[str, tuple[int, ...]]
Meta = dict[str, Any]


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    detect: Callable[[Path], bool]
    read: Callable[[Path], tuple[Tensors, Meta]]
    inspect: Callable[[Path], tuple[Shapes, Meta]]


def _inspect_by_reading(read: Callable[[Path], tuple[Tensors, Meta]]) -> Callable[[Path], tuple[Shapes, Meta]]:
    """For a format whose names and sizes come from its tensors: convert in full, keep the shapes."""
    def inspect(path: Path) -> tuple[Shapes, Meta]:
        tensors, meta = read(path)
        check_tensors(tensors, path)  # what load_delta_checkpoint refuses, inspection refuses too
        return {n: tuple(t.shape) for n, t in tensors.items()}, meta
    return inspect


# Tried in order; the first whose ``detect`` holds reads the folder. A folder none of them recognises is read as
# this project's format, whose reader names the missing file.
FORMATS: list[CheckpointFormat] = [
    CheckpointFormat("native", is_native_folder, read_native, inspect_native),
    CheckpointFormat("peft", is_peft_folder, read_peft_folder, _inspect_by_reading(read_peft_folder)),
    CheckpointFormat("adapterhub", is_adapterhub_folder, read_adapterhub_folder,
                     _inspect_by_reading(read_adapterhub_folder)),
]


def checkpoint_format(path: str | Path) -> CheckpointFormat | None:
    """The registered format of folder ``path``, or None when no format recognises it."""
    path = Path(path)
    if not path.is_dir():
        return None
    return next((f for f in FORMATS if f.detect(path)), None)


def _checkpoint_folder(path: str | Path) -> tuple[Path, CheckpointFormat]:
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: delta checkpoint folder not found")
    if not path.is_dir():
        raise UserInputError(f"{path}: expected a delta checkpoint folder, found a file")
    return path, checkpoint_format(path) or FORMATS[0]


def read_checkpoint_folder(path: str | Path) -> tuple[Tensors, Meta]:
    """A folder of a foreign format (PEFT, AdapterHub) read as this project's (tensors, meta)."""
    path = Path(path)
    fmt = checkpoint_format(path)
    if fmt is None or fmt.name == "native":
        raise UserInputError(f"{path}: not a PEFT or AdapterHub adapter folder")
    tensors, meta = fmt.read(path)
    return check_tensors(tensors, path), meta


def load_delta_checkpoint(path: str | Path) -> tuple[Tensors, Meta]:
    """Read a checkpoint folder of any registered format: (tensors, meta), every tensor checked to be floating
    point and finite. Every user-fixable problem is a UserInputError."""
    folder, fmt = _checkpoint_folder(path)
    tensors, meta = fmt.read(folder)
    return check_tensors(tensors, folder), meta


def inspect_delta_checkpoint(path: str | Path) -> tuple[Shapes, Meta]:
    """(parameter name -> shape, meta) of a checkpoint folder, checked as ``load_delta_checkpoint`` checks it.

    For this project's format only the safetensors header is read, so a caller can check many checkpoints up
    front while holding none of them; an AdapterHub folder is converted in full and its tensors dropped.
    """
    folder, fmt = _checkpoint_folder(path)
    return fmt.inspect(folder)
