"""Source modules: which tasks a target draws on, and the checkpoints on disk behind them.

A ``Module`` is a checked checkpoint (meta and tensor shapes read, tensors not kept); ``ModuleCache`` opens
each folder once however many targets use it; ``materialise`` and ``read_tensors`` turn any kind of source
(tensors, a loader, a path, a Module) into tensors, all of them or only some keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from models.delta import WEIGHTS_FILE
from models.formats import check_tensors, inspect_delta_checkpoint, load_delta_checkpoint
from models.run_folders import resolve_checkpoint
from utils.errors import UserInputError


def fused_dir_name(target: str) -> str:
    return f"without_{target}"


def leave_one_out(target: str, tasks: Sequence[str]) -> list[str]:
    """Every task of ``tasks`` except ``target``, in order; an empty result is refused."""
    sources = [t for t in tasks if t != target]
    if not sources:
        raise UserInputError(f"--tasks: target {target!r} has no source (the list holds only the target)")
    return sources


def category_sources(target: str, tasks: Sequence[str], categories: Mapping[str, str],
                     category: str | None = None) -> list[str]:
    """'Manual division': tasks of ``category`` (default: the target's own) in ``tasks``, minus the target."""
    if category is None:
        if target not in categories:
            raise UserInputError(f"--tasks: target {target!r} has no manual category (task_list.MANUAL_CATEGORIES "
                                 "or the task folder's task_categories.tsv)")
        category = categories[target]
    sources = [t for t in tasks if t != target and categories.get(t) == category]
    if not sources:
        raise UserInputError(f"--TASK_LIST: no task of category {category!r} in --tasks besides the target {target!r}")
    return sources


@dataclass
class Module:
    """A validated delta checkpoint: where it is, its meta and its tensor shapes (tensors are not kept)."""

    label: str
    path: Path
    meta: dict[str, Any]
    shapes: dict[str, tuple[int, ...]] = field(repr=False)

    def load(self) -> dict[str, torch.Tensor]:
        return load_delta_checkpoint(self.path)[0]

    def task_vector(self) -> dict[str, torch.Tensor]:
        """What the module does: its method's task vector (LoRA: ΔW = B·A·alpha/r per pair; else its parameters)."""
        from models.delta import DeltaConfig

        cfg = DeltaConfig.from_checkpoint_meta(self.meta)
        return cfg.spec.task_vector(self.load(), cfg.sizes())


def resolve_module(path: str | Path, label: str, task: str | None) -> Path:
    try:
        return resolve_checkpoint(path, task)
    except UserInputError as e:
        raise UserInputError(f"{label}: {e}") from None


def open_module(path: str | Path, label: str, task: str | None = None) -> Module:
    """Resolve (checkpoint, run or task folder) and check its meta and safetensors header now, without
    reading the tensors (a truncated file fails here too), as get_similarity.scoring checks its sources."""
    folder = resolve_module(path, label, task)
    try:
        shapes, meta = inspect_delta_checkpoint(folder)
    except UserInputError as e:
        raise UserInputError(f"{label}: {e}") from None
    return Module(label, folder, meta, shapes)


def check_same_kind(modules: Sequence[Module], delta: str) -> None:
    """All modules must have method ``delta`` and the same sizes, backbone and tensor names/shapes."""
    if not modules:
        raise UserInputError("no source module given")
    ref = modules[0]
    for m in modules:
        if m.meta.get("method") != delta:
            raise UserInputError(f"{m.path}: {m.label} is a {m.meta.get('method')} module; --delta is {delta}")
        for key in ("sizes", "backbone", "backbone_fingerprint"):
            mine, theirs = m.meta.get(key), ref.meta.get(key)
            if key == "backbone_fingerprint" and isinstance(mine, dict) and isinstance(theirs, dict):
                # modules written before the weights hash existed record less: compare what both record
                mine, theirs = ({k: d[k] for k in mine.keys() & theirs.keys()} for d in (mine, theirs))
            if mine != theirs:
                raise UserInputError(f"{m.path}: {m.label} has {key} {m.meta.get(key)!r}, but {ref.path} "
                                     f"({ref.label}) has {ref.meta.get(key)!r}")
        if m.shapes != ref.shapes:
            diff = sorted(set(m.shapes) ^ set(ref.shapes)) or [k for k in m.shapes if m.shapes[k] != ref.shapes[k]]
            raise UserInputError(f"{m.path}: {m.label} has tensors that differ from {ref.path} ({ref.label}), "
                                 f"e.g. {diff[0]}")


class ModuleCache:
    """Opens each checkpoint folder once, however many targets use it."""

    def __init__(self) -> None:
        self.by_path: dict[Path, Module] = {}

    def open(self, path: str | Path, label: str, task: str | None = None) -> Module:
        key = resolve_module(path, label, task).resolve()
        if key not in self.by_path:
            self.by_path[key] = open_module(key, label)
        return self.by_path[key]

    def check(self, delta: str) -> None:
        check_same_kind(list(self.by_path.values()), delta)


# A source: tensors in memory, a zero-argument loader of them, a checkpoint path, or a checked Module.
ModuleSource = Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]] | str | Path | Module


def materialise(src: ModuleSource, index: int) -> tuple[Mapping[str, torch.Tensor], str]:
    if isinstance(src, Module):
        return src.load(), str(src.path)
    if isinstance(src, str | Path):
        folder = resolve_checkpoint(src)
        return load_delta_checkpoint(folder)[0], str(folder)
    tensors = src() if callable(src) else src
    return check_tensors(dict(tensors), f"source #{index}"), f"source #{index}"


def read_tensors(src: ModuleSource, keys: Sequence[str], index: int) -> dict[str, torch.Tensor]:
    """Only ``keys`` of a source: from the safetensors file without reading the rest, where there is one."""
    folder = src.path if isinstance(src, Module) else resolve_checkpoint(src) if isinstance(src, str | Path) else None
    if folder is not None and (folder / WEIGHTS_FILE).is_file():
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}
    tensors, _ = materialise(src, index)  # in memory already, a loader, or an AdapterHub folder
    return {k: tensors[k] for k in keys}
