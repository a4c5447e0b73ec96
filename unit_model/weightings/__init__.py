"""Weighting methods behind one table: how each source of a target gets its weight.

Each entry of ``WEIGHTINGS`` says everything the rest of the code asks of a weighting: its planner
(``plan(config, tasks, cache) -> Weighting``; the helpers in ``base.py`` turn scores into softmax weights), the
study outputs it reads (which optional stages must run), the temperature the original code used on its raw
scores (``@original``), whether its weights rank the sources (the transferability report), and the fusion
settings that make it what it is (``manual`` is ``average`` over the target's own category). The fusion-name
parser, the study's stages and inputs and the report all read this table.

Every similarity metric of ``get_similarity/metrics.py`` is a weighting too, without an entry here: its record
is made from the metric registry (``get_weighting``), so a new metric is a new weighting at once.

To add one: write ``unit_model/weightings/<name>.py`` with its planner and add one ``WeightingSpec`` line to
``WEIGHTINGS`` below; ``unit_model/unit_model_<name>.py`` is its script, if it wants one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from unit_model.config import FusionConfig
from unit_model.sources import ModuleCache
from unit_model.weightings.average import plan_average
from unit_model.weightings.base import Weighting
from unit_model.weightings.cos import plan_cos
from unit_model.weightings.euclidean import plan_euclidean
from unit_model.weightings.learned import plan_learned_start
from unit_model.weightings.performance import plan_performance
from unit_model.weightings.similarity import plan_others
from utils.errors import UserInputError

Planner = Callable[[FusionConfig, list[str], ModuleCache], Weighting]
# What a weighting may read of a study, and the fusion setting each one fills (pipeline/layout.py has the paths).
STUDY_INPUTS = {"random": "random_tuned_ckpt_path", "tuneall": "tuneall_ckpt_path", "devall": "devall_tsv",
                "similarity": "result_tsv"}
ORIGINAL_METRIC_TEMPERATURE = 0.1  # the original code's T for every similarity metric's raw scores


@dataclass(frozen=True)
class WeightingSpec:
    name: str
    planner: Planner
    inputs: tuple[str, ...] = ()  # keys of STUDY_INPUTS: the study stages whose outputs it reads
    original_temperature: float | None = None  # the original code's T on raw scores; None: no @original form
    ranks_sources: bool = True  # False where every source gets the same weight (no ranking to validate)
    learns_weights: bool = False  # searched on the target's train split (unit_model/learned.py)
    in_study: bool = True  # False: a script's generic entry (others: whichever metric --metric names)
    config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # settings that make it


WEIGHTINGS: dict[str, WeightingSpec] = {w.name: w for w in (
    WeightingSpec("average", plan_average, ranks_sources=False),
    WeightingSpec("manual", plan_average, ranks_sources=False, config=MappingProxyType({"TASK_LIST": "manual"})),
    WeightingSpec("cos", plan_cos, inputs=("random",), original_temperature=0.001),
    WeightingSpec("Euclidean", plan_euclidean, inputs=("tuneall",), original_temperature=0.1),
    WeightingSpec("Performance", plan_performance, inputs=("tuneall", "devall"), original_temperature=0.001),
    WeightingSpec("learned", plan_learned_start, learns_weights=True),
    WeightingSpec("others", plan_others, inputs=("similarity",), original_temperature=ORIGINAL_METRIC_TEMPERATURE,
                  in_study=False),
)}


def metric_names(method: str | None = None) -> list[str]:
    """The similarity metrics (those that apply to delta ``method`` when given), from their registry
    (get_similarity/metrics.py), in registration order."""
    from get_similarity.metrics import METRICS

    return [name for name, metric in METRICS.items() if method is None or metric.applies_to(method)]


def get_weighting(name: str) -> WeightingSpec:
    """The table's entry, or a similarity metric's (weights from its scores in the study's similarity table)."""
    if name in WEIGHTINGS:
        return WEIGHTINGS[name]
    if name in metric_names():  # the generic entry, fixed to this metric
        return replace(WEIGHTINGS["others"], name=name, in_study=True, config=MappingProxyType({"metric": name}))
    raise UserInputError(f"fusion method: expected one of {', '.join(study_weightings())}, found {name!r}")


def study_weightings() -> list[str]:
    """Every weighting a study may name: the table's (but a script's generic ``others``) and every metric."""
    return [*(n for n, w in WEIGHTINGS.items() if w.in_study), *metric_names()]
