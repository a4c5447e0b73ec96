"""Weighted fusion of source delta modules into the starting point of a target's delta module.

For a target task t and its sources S (leave-one-out by default: every task of ``--tasks`` but t), each
source s gets a score, the scores become weights

    w_s = softmax_s(sign * score_s / T),   sign = +1 if a higher score means "more similar", -1 if lower,

and the fused module θ = Σ_s w_s θ_s is saved as a delta checkpoint that ``tune.py --train_checkpoint``
starts from. The five scripts ``unit_model_{average,cos,Euclidean,Performance,others}.py`` differ only in
where the scores come from; everything else (loading, checks, weights, fusion, outputs) lives here.

Granularity (``model``/``block``/``layer``, groups from ``models.delta.param_group``): at ``block`` or
``layer`` every group has its own scores and its own softmax, and the parameters of a group are averaged
with that group's weights.

LoRA (``--lora_combine``). The default is ``delta_w``. A LoRA module is the update ΔW = B·A·(alpha/r) and
only ΔW is determined by training: B·M and M⁻¹·A give the same module for any invertible r×r matrix M, so
the factors of separately tuned sources are expressed in unrelated bases. Averaging the factors
(``params``) gives B̄·Ā = Σ_s Σ_s' w_s w_s' B_s A_s', mostly cross terms B_s·A_s' that no source learned
(with N uniform weights the N wanted terms carry 1/N of the total weight). ``delta_w`` averages what the
sources do, Σ_s w_s ΔW_s, whatever their factorisation, and factors it back to rank r by truncated SVD,
the best rank-r approximation (Eckart-Young); the singular values are split symmetrically (sqrt(S) into
each factor) and the common scaling alpha/r is divided back out, so the fused module has the sources'
shapes. Its cost is the truncation error ‖Σ - B'A'‖_F / ‖Σ‖_F, logged and stored in the checkpoint's
meta. ``params`` is kept for comparison with the original code, which averaged state dicts; it is close
to ``delta_w`` only when all sources started from the same A and moved little. A pair whose fused ΔW is
exactly zero keeps the parameter average, because zero A and B factors would get zero gradients.
Adapters and prefixes are always averaged parameter-wise.

Streaming: ``fuse`` loads one source at a time and adds it into a float64 accumulator, so memory stays
near two modules however many sources there are. ``delta_w`` then takes the LoRA pairs one at a time,
reading only that pair's factors of each source (from the safetensors file), so one out×in matrix is
alive at a time.

Outputs, in ``save_ckpt_path``: ``without_{target}/`` (a delta checkpoint per target), ``weights.tsv``
(target, source, [group,] score, weight) and ``heatmap.png`` (targets in rows, sources in columns). All
inputs are checked before anything is written; the outputs are built in a hidden sibling folder and
renamed into place, so a failed run leaves nothing in ``save_ckpt_path``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from models.delta import CONFIG_FILE, GRANULARITIES, METHODS, DeltaConfig, param_group, save_delta_checkpoint
from models.delta import WEIGHTS_FILE as DELTA_WEIGHTS_FILE
from models.formats import inspect_delta_checkpoint, load_delta_checkpoint
from models.run_folders import resolve_checkpoint
from task_list import MANUAL_CATEGORIES, resolve_tasks
from utils import params as utils_params
from utils.errors import UserInputError
from utils.io import check_output_folder, save_figure_atomic, write_tsv_atomic

LORA_COMBINES = ("params", "delta_w")
DEFAULT_LORA_COMBINE = "delta_w"
COS_MODES = ("flat", "per_tensor")
DIRECTIONS = ("lower", "higher")
SIMILARITY_COLUMNS = ["target", "source", "metric", "group", "score"]
DEVALL_COLUMNS = ["target", "source", "dev_zero_shot", "dev_after"]
WEIGHTS_FILE = "weights.tsv"
HEATMAP_FILE = "heatmap.png"
ANNOTATE_MAX_COLUMNS = 12


def fused_dir_name(target: str) -> str:
    return f"without_{target}"


# --------------------------------------------------------------------------------------------------
# Source lists and weights


def leave_one_out(target: str, tasks: Sequence[str]) -> list[str]:
    """Every task of ``tasks`` except ``target``, in order; an empty result is refused."""
    sources = [t for t in tasks if t != target]
    if not sources:
        raise UserInputError(f"--tasks: target {target!r} has no source (the list holds only the target)")
    return sources


def category_sources(target: str, tasks: Sequence[str], category: str | None = None) -> list[str]:
    """'Manual division': tasks of ``category`` (default: the target's own) in ``tasks``, minus the target."""
    if category is None:
        if target not in MANUAL_CATEGORIES:
            raise UserInputError(f"--tasks: target {target!r} has no manual category in task_list.MANUAL_CATEGORIES")
        category = MANUAL_CATEGORIES[target]
    sources = [t for t in tasks if t != target and MANUAL_CATEGORIES.get(t) == category]
    if not sources:
        raise UserInputError(f"--TASK_LIST: no task of category {category!r} in --tasks besides the target {target!r}")
    return sources


def metric_direction(metric: str) -> str:
    """'lower' or 'higher': which way of a similarity metric means "more similar" (as the metric declares)."""
    from get_similarity.metrics import METRICS

    if metric not in METRICS:
        raise UserInputError(f"--metric: unknown similarity metric {metric!r}; expected one of {', '.join(METRICS)}")
    return METRICS[metric].direction


def check_temperature(temperature: float) -> float:
    if not isinstance(temperature, int | float) or not math.isfinite(temperature) or temperature <= 0:
        raise UserInputError(f"--tem: expected a positive finite temperature, found {temperature!r}")
    return float(temperature)


def softmax_weights(
    scores: Mapping[str, float], direction: str, temperature: float, target: str = "?"
) -> dict[str, float]:
    """w_s = softmax(sign * score_s / T) over the sources (sign +1 for 'higher', -1 for 'lower')."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}, found {direction!r}")
    temperature = check_temperature(temperature)
    if not scores:
        raise UserInputError(f"target {target!r}: no source to weight")
    for source, s in scores.items():
        if not isinstance(s, int | float) or not math.isfinite(s):
            raise UserInputError(f"score of (target={target}, source={source}) is {s!r}; expected a finite number")
    sign = 1.0 if direction == "higher" else -1.0
    logits = {s: sign * float(v) / temperature for s, v in scores.items()}
    top = max(logits.values())  # subtract the max: exp never overflows
    exp = {s: math.exp(v - top) for s, v in logits.items()}
    total = math.fsum(exp.values())
    return {s: e / total for s, e in exp.items()}


def group_softmax_weights(
    scores: Mapping[str, Mapping[str, float]], direction: str, temperature: float, target: str = "?"
) -> dict[str, dict[str, float]]:
    """Per-group softmax: scores[source][group] -> weights[source][group]; every source needs every group."""
    groups = list(next(iter(scores.values()))) if scores else []
    for source, by_group in scores.items():
        if sorted(by_group) != sorted(groups):
            raise UserInputError(f"target {target!r}: source {source!r} is scored on groups {sorted(by_group)}, "
                                 f"others on {sorted(groups)}")
    weights: dict[str, dict[str, float]] = {s: {} for s in scores}
    for g in groups:
        per_group = softmax_weights({s: scores[s][g] for s in scores}, direction, temperature, target)
        for s, w in per_group.items():
            weights[s][g] = w
    return weights


# --------------------------------------------------------------------------------------------------
# Modules on disk


@dataclass
class Module:
    """A validated delta checkpoint: where it is, its meta and its tensor shapes (tensors are not kept)."""

    label: str
    path: Path
    meta: dict[str, Any]
    shapes: dict[str, tuple[int, ...]] = field(repr=False)

    def load(self) -> dict[str, torch.Tensor]:
        return load_delta_checkpoint(self.path)[0]


def _resolve(path: str | Path, label: str, task: str | None) -> Path:
    try:
        return resolve_checkpoint(path, task)
    except UserInputError as e:
        raise UserInputError(f"{label}: {e}") from None


def open_module(path: str | Path, label: str, task: str | None = None) -> Module:
    """Resolve (checkpoint, run or task folder) and check its meta and safetensors header now, without
    reading the tensors (a truncated file fails here too), as get_similarity.score checks its sources."""
    folder = _resolve(path, label, task)
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
            if m.meta.get(key) != ref.meta.get(key):
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
        key = _resolve(path, label, task).resolve()
        if key not in self.by_path:
            self.by_path[key] = open_module(key, label)
        return self.by_path[key]

    def check(self, delta: str) -> None:
        check_same_kind(list(self.by_path.values()), delta)


# --------------------------------------------------------------------------------------------------
# Fusion


# A source: tensors in memory, a zero-argument loader of them, a checkpoint path, or a checked Module.
ModuleSource = Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]] | str | Path | Module


def _materialise(src: ModuleSource, index: int) -> tuple[Mapping[str, torch.Tensor], str]:
    if isinstance(src, Module):
        return src.load(), str(src.path)
    if isinstance(src, str | Path):
        folder = resolve_checkpoint(src)
        return load_delta_checkpoint(folder)[0], str(folder)
    if callable(src):
        return src(), f"source #{index}"
    return src, f"source #{index}"


def _read_tensors(src: ModuleSource, keys: Sequence[str], index: int) -> dict[str, torch.Tensor]:
    """Only ``keys`` of a source: from the safetensors file without reading the rest, where there is one."""
    folder = src.path if isinstance(src, Module) else resolve_checkpoint(src) if isinstance(src, str | Path) else None
    if folder is not None and (folder / DELTA_WEIGHTS_FILE).is_file():
        with safe_open(str(folder / DELTA_WEIGHTS_FILE), framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}
    tensors, _ = _materialise(src, index)  # in memory already, a loader, or an AdapterHub folder
    return {k: tensors[k] for k in keys}


def lora_pairs(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """LoRA module prefix -> (lora_A key, lora_B key). ``adapters`` stores A as (r, in) and B as (out, r)."""
    keys = set(keys)
    pairs = {}
    for k in sorted(keys):
        if k.endswith(".lora_A"):
            prefix = k[: -len("lora_A")]
            if prefix + "lora_B" not in keys:
                raise UserInputError(f"LoRA tensor {k} has no matching lora_B")
            pairs[prefix] = (k, prefix + "lora_B")
        elif k.endswith(".lora_B") and k[: -len("lora_B")] + "lora_A" not in keys:
            raise UserInputError(f"LoRA tensor {k} has no matching lora_A")
    return pairs


def lora_factor(delta_w: torch.Tensor, r: int, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') of shapes (out, r), (r, in) with B'·A'·scaling the best rank-r approximation of ``delta_w``."""
    u, s, vh = torch.linalg.svd(delta_w, full_matrices=False)
    k = min(r, s.numel())
    root = (s[:k] / scaling).sqrt()  # sqrt(S) into each factor; /scaling undoes the module's alpha/r
    b = delta_w.new_zeros(delta_w.shape[0], r)
    a = delta_w.new_zeros(r, delta_w.shape[1])
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return b, a


def _weight_by_group(weight: float | Mapping[str, float], groups: set[str], label: str) -> dict[str, float]:
    by_group = {g: weight for g in groups} if isinstance(weight, int | float) else dict(weight)
    missing = sorted(groups - set(by_group))
    if missing:
        raise UserInputError(f"{label}: no weight for parameter group(s) {', '.join(missing)}")
    for g, w in by_group.items():
        if not isinstance(w, int | float) or not math.isfinite(w):
            raise UserInputError(f"{label}: weight of group {g} is {w!r}; expected a finite number")
    return {g: float(by_group[g]) for g in groups}


def fuse(
    sources: Iterable[ModuleSource],
    weights: Sequence[float | Mapping[str, float]],
    *,
    granularity: str = "model",
    lora_combine: str = DEFAULT_LORA_COMBINE,
    lora_scaling: float = 1.0,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Σ_s w_s θ_s, streamed: one source is loaded at a time (dicts, loaders, checkpoint paths or Modules).

    ``weights[s]`` is a number or, per group, a mapping ``param_group(name, granularity) -> weight``.
    Weights are used as given (callers pass softmax weights, which sum to 1). With ``lora_combine=
    "delta_w"`` each LoRA pair becomes the rank-r SVD factors of Σ_s w_s B_s A_s (see the module doc),
    built in a second pass, pair by pair, that reads only that pair's factors of each source (so
    ``sources`` must then be iterable twice); ``info`` holds ``lora_truncation_error`` (over the whole
    module) and its per-pair maximum.
    """
    if lora_combine not in LORA_COMBINES:
        raise UserInputError(f"--lora_combine: expected one of {', '.join(LORA_COMBINES)}, found {lora_combine!r}")
    weights = list(weights)
    if not weights:
        raise UserInputError("fuse: empty source list")
    if lora_combine == "delta_w" and iter(sources) is sources:
        raise TypeError("fuse: lora_combine='delta_w' reads the sources twice; pass a sequence (of paths, Modules "
                        "or loaders, to keep memory low), not a one-shot iterator")
    acc: dict[str, torch.Tensor] = {}
    ref: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    group_of: dict[str, str] = {}
    source_weights: list[dict[str, float]] = []
    count = 0
    for i, src in enumerate(sources):
        if i >= len(weights):
            raise ValueError(f"fuse: more sources than the {len(weights)} weights")
        tensors, label = _materialise(src, i)
        del src  # hold no second reference: the accumulator plus this source is all that stays alive
        if i == 0:
            ref = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
            group_of = {k: param_group(k, granularity) for k in ref}
            acc = {k: torch.zeros(shape, dtype=torch.float64) for k, (shape, _) in ref.items()}
        elif {k: tuple(v.shape) for k, v in tensors.items()} != {k: s for k, (s, _) in ref.items()}:
            raise UserInputError(f"{label}: tensor names or shapes differ from the first source's")
        w = _weight_by_group(weights[i], set(group_of.values()), label)
        source_weights.append(w)
        for k, v in tensors.items():
            acc[k].add_(v.to(torch.float64), alpha=w[group_of[k]])
        del tensors
        count += 1
    if count != len(weights):
        raise ValueError(f"fuse: {count} sources for {len(weights)} weights")

    fused = {k: acc.pop(k).to(dtype) for k, (_, dtype) in ref.items()}
    info: dict[str, Any] = {}
    pairs = lora_pairs(ref) if lora_combine == "delta_w" else {}
    if pairs:
        err_sq = norm_sq = 0.0
        worst = 0.0
        for ka, kb in pairs.values():
            # One pair at a time: its Σ w B·A (out × in) is the only dense matrix alive.
            total = torch.zeros(ref[kb][0][0], ref[ka][0][1], dtype=torch.float64)
            for i, src in enumerate(sources):
                if i >= count:
                    break
                factors = _read_tensors(src, (ka, kb), i)
                total.addmm_(factors[kb].to(torch.float64), factors[ka].to(torch.float64),
                             alpha=source_weights[i][group_of[ka]] * lora_scaling)
            norm = float(torch.linalg.matrix_norm(total))
            if norm == 0.0:
                continue  # keep the parameter average: zero factors would never train
            b, a = lora_factor(total, ref[ka][0][0], lora_scaling)
            err = float(torch.linalg.matrix_norm(total - b @ a * lora_scaling))
            fused[ka], fused[kb] = a.to(ref[ka][1]), b.to(ref[kb][1])
            err_sq, norm_sq, worst = err_sq + err**2, norm_sq + norm**2, max(worst, err / norm)
        info["lora_truncation_error"] = math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0
        info["lora_truncation_error_max"] = worst
    return fused, info


# --------------------------------------------------------------------------------------------------
# Scores from module weights (cos, Euclidean)


def groups_of(keys: Iterable[str], granularity: str) -> dict[str, list[str]]:
    """Group -> sorted tensor names."""
    groups: dict[str, list[str]] = {}
    for k in sorted(keys):
        groups.setdefault(param_group(k, granularity), []).append(k)
    return groups


def cosine_by_group(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], granularity: str = "model", mode: str = "flat"
) -> dict[str, float]:
    """cos(a, b) per group: of the flattened group (``flat``) or the mean of per-tensor cosines (``per_tensor``).

    A zero vector has cosine 0 with everything (as torch's cosine_similarity with its eps).
    """
    if mode not in COS_MODES:
        raise UserInputError(f"--cos_mode: expected one of {', '.join(COS_MODES)}, found {mode!r}")

    def cos(dot: float, na: float, nb: float) -> float:
        return dot / math.sqrt(na * nb) if na > 0 and nb > 0 else 0.0

    out = {}
    for g, keys in groups_of(a, granularity).items():
        parts = []
        for k in keys:
            x, y = a[k].double().flatten(), b[k].double().flatten()
            parts.append((float(x @ y), float(x @ x), float(y @ y)))
        if mode == "flat":
            out[g] = cos(*(math.fsum(p[i] for p in parts) for i in range(3)))
        else:
            out[g] = math.fsum(cos(*p) for p in parts) / len(parts)
    return out


def distance_by_group(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], granularity: str = "model"
) -> dict[str, float]:
    """‖a - b‖₂ of the flattened parameters of each group."""
    return {
        g: math.sqrt(math.fsum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in keys))
        for g, keys in groups_of(a, granularity).items()
    }


# --------------------------------------------------------------------------------------------------
# Score tables (dev-all, zero-shot similarity)


def _read_table(path: Path, columns: list[str], flag: str) -> list[tuple[int, dict[str, str]]]:
    if not path.is_file():
        raise UserInputError(f"{flag} {path}: file not found")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise UserInputError(f"{path}:1: missing columns {missing}; expected {columns}")
        return [(i, row) for i, row in enumerate(reader, start=2)]


def _number(text: str, path: Path, line: int, column: str) -> float:
    """A finite number: a NaN or infinite score would turn every weight of its softmax into NaN."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UserInputError(f"{path}:{line}: {column}: expected a number, found {text!r}") from None
    if not math.isfinite(value):
        raise UserInputError(f"{path}:{line}: {column}: expected a finite number, found {text!r}")
    return value


def read_devall_tsv(path: str | Path) -> dict[tuple[str, str], float | None]:
    """(target, source) -> dev_after - dev_zero_shot, or None where dev_after is '-' (no tuned module)."""
    path = Path(path)
    gains: dict[tuple[str, str], float | None] = {}
    for line, row in _read_table(path, DEVALL_COLUMNS, "--devall_tsv"):
        key = (row["target"], row["source"])
        if key in gains:
            raise UserInputError(f"{path}:{line}: (target={key[0]}, source={key[1]}) listed twice")
        zero = _number(row["dev_zero_shot"], path, line, "dev_zero_shot")
        after = None if row["dev_after"] == "-" else _number(row["dev_after"], path, line, "dev_after")
        gains[key] = None if after is None else after - zero
    return gains


def read_similarity_tsv(path: str | Path, metric: str | None) -> tuple[str, dict[tuple[str, str, str], float]]:
    """(metric, {(target, source, group): score}) from a get_similarity result.tsv.

    ``metric`` may be None when the file holds a single metric. A score that is not a finite number is
    refused with its file, line and (target, source, group).
    """
    path = Path(path)
    rows = _read_table(path, SIMILARITY_COLUMNS, "--result_tsv")
    metrics = sorted({row["metric"] for _, row in rows})
    if not metrics:
        raise UserInputError(f"{path}: no rows")
    if metric is None:
        if len(metrics) > 1:
            raise UserInputError(f"{path}: holds metrics {', '.join(metrics)}; choose one with --metric")
        metric = metrics[0]
    elif metric not in metrics:
        raise UserInputError(f"--metric {metric}: not in {path} (it holds {', '.join(metrics)})")
    scores: dict[tuple[str, str, str], float] = {}
    for line, row in rows:
        if row["metric"] != metric:
            continue
        key = (row["target"], row["source"], row["group"])
        if key in scores:
            raise UserInputError(f"{path}:{line}: (target={key[0]}, source={key[1]}, group={key[2]}) listed twice")
        scores[key] = _number(row["score"], path, line,
                              f"score of (target={key[0]}, source={key[1]}, group={key[2]})")
    return metric, scores


# --------------------------------------------------------------------------------------------------
# Plans: what each target averages, with which weights


@dataclass
class Plan:
    target: str
    sources: list[str]
    modules: list[Module]  # averaged, aligned with sources
    weights: dict[str, dict[str, float]]  # source -> group -> weight
    scores: dict[str, dict[str, float]] | None = None  # source -> group -> score; None for a uniform average


def _check_common(args: argparse.Namespace) -> list[str]:
    if args.delta not in METHODS:
        raise UserInputError(f"--delta: expected one of {', '.join(METHODS)}, found {args.delta!r}")
    check_temperature(args.tem)
    if args.lora_combine not in LORA_COMBINES:
        raise UserInputError(f"--lora_combine: expected one of {', '.join(LORA_COMBINES)}, "
                             f"found {args.lora_combine!r}")
    if getattr(args, "granularity", "model") not in GRANULARITIES:
        raise UserInputError(f"--granularity: expected one of {', '.join(GRANULARITIES)}, found {args.granularity!r}")
    for flag in ("source_ckpt_path", "save_ckpt_path"):
        if not getattr(args, flag):
            raise UserInputError(f"--{flag}: required")
    tasks = resolve_tasks(args.tasks)
    # Targets default to every task; a study fuses for a few targets, each with all other tasks as sources.
    targets = getattr(args, "targets", None)
    args.target_list = resolve_tasks(targets, flag="--targets") if targets else tasks
    outside = [t for t in args.target_list if t not in tasks]
    if outside:
        raise UserInputError(f"--targets: {', '.join(outside)} not among --tasks (the source pool)")
    return tasks


def _require(args: argparse.Namespace, flag: str) -> str:
    value = getattr(args, flag)
    if not value:
        raise UserInputError(f"--{flag}: required by this fusion method")
    return value


def _source_modules(cache: ModuleCache, root: str, target: str, sources: list[str]) -> list[Module]:
    return [cache.open(Path(root) / s, f"source {s!r} (for target {target!r})", s) for s in sources]


def plan_average(args: argparse.Namespace, tasks: list[str], cache: ModuleCache) -> list[Plan]:
    """Uniform weights over 'all' (leave-one-out), the target's own category ('manual') or a named category."""
    categories = sorted(set(MANUAL_CATEGORIES.values()))
    mode = "manual" if getattr(args, "manual", False) else args.TASK_LIST
    if args.manual and args.TASK_LIST not in ("all", "manual"):
        raise UserInputError(f"--manual conflicts with --TASK_LIST {args.TASK_LIST}")
    if mode not in ("all", "manual", *categories):
        raise UserInputError(f"--TASK_LIST: expected all, manual or a category ({', '.join(categories)}), "
                             f"found {mode!r}")
    plans = []
    for t in args.target_list:
        if mode == "all":
            sources = leave_one_out(t, tasks)
        else:
            sources = category_sources(t, tasks, None if mode == "manual" else mode)
        weights = {s: {"model": 1.0 / len(sources)} for s in sources}
        plans.append(Plan(t, sources, _source_modules(cache, args.source_ckpt_path, t, sources), weights))
    return plans


def _weight_plans(
    args: argparse.Namespace, tasks: list[str], cache: ModuleCache, score_fn, direction: str, desc: str,
    averaged_root=None,
) -> list[Plan]:
    """Plans whose scores come from module weights: ``score_fn(target, source, source_module) -> group -> score``."""
    plans = []
    for t in args.target_list:
        sources = leave_one_out(t, tasks)
        modules = _source_modules(cache, args.source_ckpt_path, t, sources)
        plans.append(Plan(t, sources, modules, {}, {}))
    prepare = getattr(score_fn, "prepare", None)
    if prepare is not None:
        prepare(plans)  # open and check the other modules the scores need, before any tensor is read
    cache.check(args.delta)
    pairs = [(p, i) for p in plans for i in range(len(p.sources))]
    for plan, i in tqdm(pairs, desc=desc, leave=False, disable=len(pairs) < 20):
        plan.scores[plan.sources[i]] = score_fn(plan, i)
    for plan in plans:
        plan.weights = group_softmax_weights(plan.scores, direction, args.tem, plan.target)
    return plans


class _CosScores:
    """cos(θ_t^few-shot, θ_s) per group; the target module is loaded once per target."""

    def __init__(self, args: argparse.Namespace, cache: ModuleCache):
        self.args, self.cache = args, cache
        self.targets: dict[str, Module] = {}
        self.loaded: tuple[str, dict[str, torch.Tensor]] | None = None

    def prepare(self, plans: list[Plan]) -> None:
        root = Path(_require(self.args, "random_tuned_ckpt_path"))
        for p in plans:
            self.targets[p.target] = self.cache.open(root / p.target, f"random-tuned module of {p.target!r}",
                                                     p.target)

    def __call__(self, plan: Plan, i: int) -> dict[str, float]:
        if self.loaded is None or self.loaded[0] != plan.target:
            self.loaded = None  # drop the previous target first: two modules at most
            self.loaded = (plan.target, self.targets[plan.target].load())
        return cosine_by_group(self.loaded[1], plan.modules[i].load(), self.args.granularity, self.args.cos_mode)


class _DistanceScores:
    """‖θ_s - θ_s^{tuned on t}‖₂ per group."""

    def __init__(self, args: argparse.Namespace, cache: ModuleCache):
        self.args, self.cache = args, cache
        self.tuned: dict[tuple[str, str], Module] = {}

    def prepare(self, plans: list[Plan]) -> None:
        root = Path(_require(self.args, "tuneall_ckpt_path"))
        for p in plans:
            for s in p.sources:
                self.tuned[p.target, s] = self.cache.open(root / p.target / s,
                                                          f"source {s!r} tuned on {p.target!r}", s)

    def __call__(self, plan: Plan, i: int) -> dict[str, float]:
        tuned = self.tuned[plan.target, plan.sources[i]].load()
        return distance_by_group(plan.modules[i].load(), tuned, self.args.granularity)


def plan_cos(args: argparse.Namespace, tasks: list[str], cache: ModuleCache) -> list[Plan]:
    return _weight_plans(args, tasks, cache, _CosScores(args, cache), "higher", "cosine")


def plan_euclidean(args: argparse.Namespace, tasks: list[str], cache: ModuleCache) -> list[Plan]:
    return _weight_plans(args, tasks, cache, _DistanceScores(args, cache), "lower", "distance")


def plan_performance(args: argparse.Namespace, tasks: list[str], cache: ModuleCache) -> list[Plan]:
    """w ∝ softmax((dev_after - dev_zero_shot)/T); averages the tuned sources unless --average_untuned."""
    path = Path(_require(args, "devall_tsv"))
    gains = read_devall_tsv(path)
    plans = []
    for t in args.target_list:
        sources = leave_one_out(t, tasks)
        scores = {}
        for s in sources:
            if (t, s) not in gains:
                raise UserInputError(f"{path}: no row for (target={t}, source={s})")
            if gains[t, s] is None:
                raise UserInputError(f"{path}: (target={t}, source={s}) has no dev_after ('-'): the source was "
                                     "not tuned on the target")
            scores[s] = {"model": gains[t, s]}
        if args.average_untuned:
            modules = _source_modules(cache, args.source_ckpt_path, t, sources)
        else:
            root = Path(_require(args, "tuneall_ckpt_path"))
            modules = [cache.open(root / t / s, f"source {s!r} tuned on {t!r}", s) for s in sources]
        plans.append(Plan(t, sources, modules, group_softmax_weights(scores, "higher", args.tem, t), scores))
    return plans


def plan_others(args: argparse.Namespace, tasks: list[str], cache: ModuleCache) -> list[Plan]:
    """Weights from any zero-shot similarity result.tsv, each metric in its declared direction."""
    path = Path(_require(args, "result_tsv"))
    metric, table = read_similarity_tsv(path, args.metric)
    direction = metric_direction(metric)
    present = {key[0] for key in table}
    for t in args.target_list:  # before any checkpoint is opened: the likelier mistake is the wrong table
        if t not in present:
            raise UserInputError(f"{path}: target {t!r} has no {metric} rows")
    plans = []
    for t in args.target_list:
        sources = leave_one_out(t, tasks)
        plans.append(Plan(t, sources, _source_modules(cache, args.source_ckpt_path, t, sources), {}, {}))
    cache.check(args.delta)
    groups = sorted({param_group(k, args.granularity) for k in plans[0].modules[0].shapes})
    for plan in plans:
        for s in plan.sources:
            missing = [g for g in groups if (plan.target, s, g) not in table]
            if missing:
                raise UserInputError(f"{path}: no {metric} score for (target={plan.target}, source={s}, "
                                     f"group={missing[0]}) at --granularity {args.granularity}")
            plan.scores[s] = {g: table[plan.target, s, g] for g in groups}
        plan.weights = group_softmax_weights(plan.scores, direction, args.tem, plan.target)
    args.metric_used, args.direction = metric, direction
    return plans


PLANNERS = {
    "average": plan_average,
    "cos": plan_cos,
    "Euclidean": plan_euclidean,
    "Performance": plan_performance,
    "others": plan_others,
}


# --------------------------------------------------------------------------------------------------
# Outputs


def _check_destination(save: Path, plans: list[Plan], overwrite: bool) -> None:
    """Refuse to replace what this run would write (its targets' folders, the table, the plot) unless
    ``overwrite``; other targets' folders in ``save`` (parallel jobs of one sweep) are left alone."""
    check_output_folder(save, "--save_ckpt_path")
    for plan in plans:
        dest = save / fused_dir_name(plan.target)
        if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / CONFIG_FILE).is_file())):
            raise UserInputError(f"{dest}: exists and is not a delta checkpoint; not replacing it")
    for name in (WEIGHTS_FILE, HEATMAP_FILE):
        if (save / name).is_dir():
            raise UserInputError(f"{save / name}: is a folder; not replacing it")
    if not overwrite:
        ours = [save / fused_dir_name(p.target) for p in plans] + [save / WEIGHTS_FILE, save / HEATMAP_FILE]
        for dest in ours:
            if dest.exists():
                raise UserInputError(f"{dest}: exists (from an earlier fusion); pass --overwrite to replace it "
                                     "or choose another --save_ckpt_path")


def _granular(plans: list[Plan]) -> bool:
    return any(set(w) != {"model"} for p in plans for w in p.weights.values())


def _plain(d: dict[str, float]) -> float | dict[str, float]:
    return d["model"] if set(d) == {"model"} else dict(d)


def weight_rows(plans: list[Plan]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of weights.tsv."""
    granular = _granular(plans)
    header = ["target", "source", "group", "score", "weight"] if granular else ["target", "source", "score", "weight"]
    rows = []
    for p in plans:
        for s in p.sources:
            for g, w in p.weights[s].items():
                score = "-" if p.scores is None else repr(float(p.scores[s][g]))  # repr: exact round trip
                rows.append([p.target, s, *([g] if granular else []), score, repr(float(w))])
    return header, rows


def write_heatmap(path: Path, plans: list[Plan], title: str) -> None:
    """Targets in rows, sources in columns (a group-granular weight is shown as its mean over groups)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    columns = [p.target for p in plans]  # task order, so the (blank) target-on-itself cells form the diagonal
    for p in plans:
        columns += [s for s in p.sources if s not in columns]
    columns = [c for c in columns if any(c in p.sources for p in plans)]
    grid = np.full((len(plans), len(columns)), np.nan)
    for i, p in enumerate(plans):
        for s in p.sources:
            grid[i, columns.index(s)] = float(np.mean(list(p.weights[s].values())))
    annotate = len(columns) <= ANNOTATE_MAX_COLUMNS
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(columns) + 2.5), max(3.0, 0.45 * len(plans) + 1.5)))
    sns.heatmap(grid, ax=ax, annot=annotate, fmt=".2f", cmap="viridis", xticklabels=columns,
                yticklabels=[p.target for p in plans], cbar_kws={"label": "weight"})
    ax.set_xlabel("source")
    ax.set_ylabel("target")
    ax.set_title(title + (" (mean over groups)" if _granular(plans) else ""))
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path, dpi=100)
    finally:
        plt.close(fig)


def _commit(staging: Path, save: Path) -> None:
    """Move each staged entry into ``save``, replacing an older one of the same name."""
    save.mkdir(parents=True, exist_ok=True)
    for entry in sorted(staging.iterdir()):
        dest = save / entry.name
        if dest.exists():
            old = save / f".{entry.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
            os.rename(entry, dest)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(entry, dest)


def write_fusion(plans: list[Plan], args: argparse.Namespace, method: str) -> Path:
    """Fuse every target's sources and write the checkpoints, weights.tsv and heatmap.png (all or nothing)."""
    save = Path(os.path.abspath(args.save_ckpt_path))
    _check_destination(save, plans, bool(getattr(args, "overwrite", False)))
    ref = plans[0].modules[0].meta
    cfg = DeltaConfig.from_checkpoint_meta(ref)
    scaling = cfg.lora_alpha / cfg.lora_r if cfg.method == "lora" else 1.0
    lora_combine = args.lora_combine if cfg.method == "lora" else "params"
    granularity = getattr(args, "granularity", "model") if _granular(plans) else "model"
    save.parent.mkdir(parents=True, exist_ok=True)
    staging = save.parent / f".{save.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for plan in tqdm(plans, desc=f"fusing ({method})", disable=len(plans) < 3):
            weights = [plan.weights[s] for s in plan.sources]
            fused, info = fuse(plan.modules, weights, granularity=granularity, lora_combine=lora_combine,
                               lora_scaling=scaling)
            extra = {
                "fusion": method,
                "temperature": args.tem,
                "granularity": granularity,
                "sources": plan.sources,
                "weights": {s: _plain(plan.weights[s]) for s in plan.sources},
                "scores": None if plan.scores is None else {s: _plain(plan.scores[s]) for s in plan.sources},
                "source_checkpoints": [str(m.path) for m in plan.modules],
            }
            if cfg.method == "lora":
                extra["lora_combine"] = lora_combine
            if getattr(args, "metric_used", None):
                extra["metric"], extra["direction"] = args.metric_used, args.direction
            extra.update(info)
            save_delta_checkpoint(staging / fused_dir_name(plan.target), fused, cfg, ref["backbone"],
                                  ref["backbone_fingerprint"], task=plan.target, extra=extra)
            best = max(plan.sources, key=lambda s: _mean(plan.weights[s]))
            note = ""
            if "lora_truncation_error" in info:
                note = f", LoRA truncation error {info['lora_truncation_error']:.4f}"
            tqdm.write(f"{plan.target}: {len(plan.sources)} sources, largest weight {best} "
                       f"({_mean(plan.weights[best]):.3f}){note}")
        header, rows = weight_rows(plans)
        write_tsv_atomic(staging / WEIGHTS_FILE, header, rows)
        name = getattr(args, "metric_used", None) or method  # "others": name the similarity metric
        write_heatmap(staging / HEATMAP_FILE, plans, f"{name} fusion weights ({args.delta}, T={args.tem:g})")
        _commit(staging, save)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return save


def _mean(d: Mapping[str, float]) -> float:
    return math.fsum(d.values()) / len(d)


def run_fusion(method: str, args: argparse.Namespace) -> int:
    """Validate everything, compute the weights, then fuse and write (the body of every script's main)."""
    tasks = _check_common(args)
    cache = ModuleCache()
    plans = PLANNERS[method](args, tasks, cache)
    cache.check(args.delta)
    _check_destination(Path(os.path.abspath(args.save_ckpt_path)), plans, bool(getattr(args, "overwrite", False)))
    print(f"{method} fusion of {args.delta} modules for {len(plans)} target(s) into {args.save_ckpt_path}",
          flush=True)
    save = write_fusion(plans, args, method)
    print(f"wrote {len(plans)} fused checkpoint(s), {WEIGHTS_FILE} and {HEATMAP_FILE} in {save}", flush=True)
    return 0


# --------------------------------------------------------------------------------------------------
# nanoGPT-style parameter blocks: plain variables at the top of a script, each overridable as --name value

HELP = {
    "delta": "delta method of the modules; every checkpoint must have it",
    "tasks": "the task pool (names or task_list.py lists); the sources of a target are the other tasks of this list",
    "targets": "targets to fuse for (default: every task of --tasks)",
    "TASK_LIST": "sources: 'all' (leave-one-out), 'manual' (the target's own category) or a category name",
    "manual": "'manual division': average the target's own category (same as --TASK_LIST manual)",
    "source_ckpt_path": "folder with one source module per task: {source_ckpt_path}/{task}",
    "random_tuned_ckpt_path": "folder with the target modules tuned from random init: {path}/{target}",
    "tuneall_ckpt_path": "folder with every source tuned on every target: {path}/{target}/{source}",
    "devall_tsv": "dev-all table: target, source, dev_zero_shot, dev_after",
    "result_tsv": "zero-shot similarity table: target, source, metric, group, score",
    "metric": "similarity metric of --result_tsv to use (needed when the file holds several)",
    "save_ckpt_path": "output folder: without_{target}/, weights.tsv, heatmap.png",
    "tem": "softmax temperature T > 0 (large T: uniform average)",
    "lora_combine": "LoRA only: 'delta_w' averages B·A and factors back by SVD, 'params' averages A and B",
    "cos_mode": "'flat': cosine of the flattened modules; 'per_tensor': mean of per-tensor cosines (the original)",
    "granularity": "model, block or layer: one weight per group of parameters",
    "average_untuned": "average the original sources instead of the ones tuned on the target",
    "overwrite": "replace fused checkpoints, weights.tsv and heatmap.png of an earlier run in --save_ckpt_path",
}
CHOICES = {"delta": METHODS, "lora_combine": LORA_COMBINES, "cos_mode": COS_MODES, "granularity": GRANULARITIES}
LIST_PARAMS = ("tasks", "targets")  # take several words, as tune.py's --tasks does


def parse_params(params: Mapping[str, Any], argv: list[str] | None, description: str | None) -> argparse.Namespace:
    """A fusion script's parameter block parsed with the fusion flags' help and choices."""
    return utils_params.parse_params(params, argv, description, HELP, CHOICES, LIST_PARAMS)
