"""What every weighting shares: the plan it returns, softmax weights, and the helpers of the planners.

A weighting turns a target and its sources into a ``Plan``: the source modules to merge and each one's
weight per parameter group, w_s = softmax_s(norm(sign * score)_s / T), sign +1 when a higher score means
"more similar". ``norm`` makes one temperature mean the same for every metric, whatever its scale:

* ``zscore`` (the default): (x_s - mean) / std over the target's sources (population std; all 0 when the
  sources tie), so T is in units of the sources' spread;
* ``rank``: the z-score of the sources' ranks (ties share their mean rank), blind to outliers;
* ``none``: the signed scores as they are, the original code's setting (with its per-method temperatures:
  0.1 for the similarity metrics and Euclidean, 0.001 for Performance and cosine).

Weightings are registered by name in ``unit_model/weightings/__init__.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from get_similarity.metrics import DIRECTIONS  # the metric registry owns the two directions
from models.methods import param_group
from models.run_folders import source_path
from unit_model.config import SCORE_SPACES, WEIGHT_NORMS, FusionConfig
from unit_model.sources import Module, ModuleCache, leave_one_out
from utils.errors import UserInputError
from utils.io import read_tsv
from utils.progress import progress_bar


def score_vectors(module: Module, space: str) -> dict[str, torch.Tensor]:
    if space not in SCORE_SPACES:
        raise UserInputError(f"--score_space: expected one of {', '.join(SCORE_SPACES)}, found {space!r}")
    return module.task_vector() if space == "task_vector" else module.load()


def check_temperature(temperature: float) -> float:
    if not isinstance(temperature, int | float) or not math.isfinite(temperature) or temperature <= 0:
        raise UserInputError(f"--tem: expected a positive finite temperature, found {temperature!r}")
    return float(temperature)


def comparable_scores(signed: Mapping[str, float], norm: str) -> dict[str, float]:
    """Sign-corrected scores (higher = more similar) on a scale that is the same for every metric."""
    if norm not in WEIGHT_NORMS:
        raise UserInputError(f"--weight_norm: expected one of {', '.join(WEIGHT_NORMS)}, found {norm!r}")
    if norm == "none":
        return dict(signed)
    values = dict(signed)
    if norm == "rank":
        from scipy.stats import rankdata

        values = dict(zip(values, (float(r) for r in rankdata(list(values.values()))), strict=True))
    mean = math.fsum(values.values()) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values.values()) / len(values))
    if std == 0.0 or not math.isfinite(std):
        return {s: 0.0 for s in values}  # every source alike: uniform weights
    return {s: (v - mean) / std for s, v in values.items()}


def softmax_weights(
    scores: Mapping[str, float], direction: str, temperature: float, target: str = "?", norm: str = "none"
) -> dict[str, float]:
    """w_s = softmax(norm(sign * score)_s / T) over the sources (sign +1 for 'higher', -1 for 'lower')."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}, found {direction!r}")
    temperature = check_temperature(temperature)
    if not scores:
        raise UserInputError(f"target {target!r}: no source to weight")
    for source, s in scores.items():
        if not isinstance(s, int | float) or not math.isfinite(s):
            raise UserInputError(f"score of (target={target}, source={source}) is {s!r}; expected a finite number")
    sign = 1.0 if direction == "higher" else -1.0
    comparable = comparable_scores({s: sign * float(v) for s, v in scores.items()}, norm)
    logits = {s: v / temperature for s, v in comparable.items()}
    top = max(logits.values())  # subtract the max: exp never overflows
    exp = {s: math.exp(v - top) for s, v in logits.items()}
    total = math.fsum(exp.values())
    return {s: e / total for s, e in exp.items()}


def effective_sources(weights: Iterable[float]) -> float:
    """exp(entropy) of a weight vector: n for uniform weights over n sources, 1 for one-hot. Weights that do
    not sum to 1 (learned ones, maybe negative) count by their share of Σ|w|; all zero counts as 0."""
    values = [abs(w) for w in weights]
    total = math.fsum(values)
    if total == 0:
        return 0.0
    return math.exp(-math.fsum(v / total * math.log(v / total) for v in values if v > 0))


def group_softmax_weights(
    scores: Mapping[str, Mapping[str, float]], direction: str, temperature: float, target: str = "?",
    norm: str = "none",
) -> dict[str, dict[str, float]]:
    """Per-group softmax: scores[source][group] -> weights[source][group]; every source needs every group."""
    groups = list(next(iter(scores.values()))) if scores else []
    for source, by_group in scores.items():
        if sorted(by_group) != sorted(groups):
            raise UserInputError(f"target {target!r}: source {source!r} is scored on groups {sorted(by_group)}, "
                                 f"others on {sorted(groups)}")
    weights: dict[str, dict[str, float]] = {s: {} for s in scores}
    for g in groups:
        per_group = softmax_weights({s: scores[s][g] for s in scores}, direction, temperature, target, norm)
        for s, w in per_group.items():
            weights[s][g] = w
    return weights


def keep_top_k(weights: Mapping[str, Mapping[str, float]], k: int) -> dict[str, dict[str, float]]:
    """The ``k`` heaviest sources of each group keep their weights, renormalised to sum to 1; the others get 0.
    Ties go to the source named first; k = 0 or k >= the number of sources keeps every weight."""
    out = {s: dict(by_group) for s, by_group in weights.items()}
    if k <= 0 or k >= len(weights):
        return out
    groups = next(iter(weights.values())).keys()
    for g in groups:
        kept = sorted(weights, key=lambda s: (-weights[s][g], s))[:k]
        total = math.fsum(weights[s][g] for s in kept)
        for s in weights:
            out[s][g] = weights[s][g] / total if s in kept else 0.0
    return out


@dataclass
class Plan:
    target: str
    sources: list[str]
    modules: list[Module]  # averaged, aligned with sources
    weights: dict[str, dict[str, float]]  # source -> group -> weight
    scores: dict[str, dict[str, float]] | None = None  # source -> group -> score; None for a uniform average
    direction: str | None = None  # "higher" or "lower": which scores mean "more similar" (None: no scores)
    temperature: float | None = None  # the T of the weights, when chosen per target (--tem auto)
    temperature_dev: dict[float, float] | None = None  # --tem auto: the fused module's dev score at each T
    search: list[tuple[int, float, float]] | None = None  # learned weights: (evaluation, objective, best so far)


@dataclass
class Weighting:
    """A weighting's answer: one plan per target, and the similarity metric behind the scores, if any."""

    plans: list[Plan]
    metric: str | None = None
    direction: str | None = None


def require(config: FusionConfig, flag: str) -> str:
    value = getattr(config, flag)
    if not value:
        raise UserInputError(f"--{flag}: required by this fusion method")
    return value


def source_modules(cache: ModuleCache, root: str, target: str, sources: list[str]) -> list[Module]:
    return [cache.open(source_path(root, s), f"source {s!r} (for target {target!r})", s) for s in sources]


def groups_of(keys: Iterable[str], granularity: str) -> dict[str, list[str]]:
    """Group -> sorted tensor names."""
    groups: dict[str, list[str]] = {}
    for k in sorted(keys):
        groups.setdefault(param_group(k, granularity), []).append(k)
    return groups


def plans_from_module_scores(
    config: FusionConfig, tasks: list[str], cache: ModuleCache, score_fn: Callable[[Plan, int], dict[str, float]],
    direction: str, desc: str,
) -> list[Plan]:
    """Plans whose scores come from module weights: ``score_fn(plan, i) -> group -> score`` of source i.

    ``score_fn.prepare(plans)``, when it has one, opens the other modules the scores need first."""
    plans = []
    for t in config.target_list:
        sources = leave_one_out(t, tasks)
        modules = source_modules(cache, config.source_ckpt_path, t, sources)
        plans.append(Plan(t, sources, modules, {}, {}, direction))
    prepare = getattr(score_fn, "prepare", None)
    if prepare is not None:
        prepare(plans)  # open and check the other modules the scores need, before any tensor is read
    cache.check(config.delta)
    pairs = [(p, i) for p in plans for i in range(len(p.sources))]
    for plan, i in progress_bar(pairs, desc=desc, leave=False, disable=len(pairs) < 20):
        plan.scores[plan.sources[i]] = score_fn(plan, i)
    for plan in plans:
        plan.weights = group_softmax_weights(plan.scores, direction, config.tem, plan.target, config.weight_norm)
    return plans


def read_score_table(path: Path, columns: list[str], flag: str) -> list[tuple[int, dict[str, str]]]:
    """(line, row) of a score table; a missing file is named with the flag that asked for it."""
    if not path.is_file():
        raise UserInputError(f"{flag} {path}: file not found")
    return read_tsv(path, columns)


def finite_number(text: str, path: Path, line: int, column: str) -> float:
    """A finite number: a NaN or infinite score would turn every weight of its softmax into NaN."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UserInputError(f"{path}:{line}: {column}: expected a number, found {text!r}") from None
    if not math.isfinite(value):
        raise UserInputError(f"{path}:{line}: {column}: expected a finite number, found {text!r}")
    return value


