"""Weighting methods behind one registry: how each source of a target gets its weight.

To add one: write ``unit_model/weightings/<name>.py`` with a planner ``plan(config, tasks, cache) -> Weighting``
(the helpers in ``base.py`` turn scores into softmax weights), register it on the ``WEIGHTINGS`` line below,
and give it a thin ``unit_model/unit_model_<name>.py`` script with its parameter block.
"""

from __future__ import annotations

from collections.abc import Callable

from unit_model.config import COS_MODES, DEFAULT_WEIGHT_NORM, SCORE_SPACES, WEIGHT_NORMS, FusionConfig
from unit_model.sources import ModuleCache
from unit_model.weightings.average import plan_average
from unit_model.weightings.base import (
    DIRECTIONS,
    Plan,
    Weighting,
    check_temperature,
    comparable_scores,
    effective_sources,
    group_softmax_weights,
    keep_top_k,
    softmax_weights,
)
from unit_model.weightings.cos import cosine_by_group, plan_cos
from unit_model.weightings.euclidean import distance_by_group, plan_euclidean
from unit_model.weightings.learned import plan_learned_start
from unit_model.weightings.performance import plan_performance, read_devall_tsv
from unit_model.weightings.similarity import metric_direction, plan_others, read_similarity_tsv

Planner = Callable[[FusionConfig, list[str], ModuleCache], Weighting]
WEIGHTINGS: dict[str, Planner] = {"average": plan_average, "cos": plan_cos, "Euclidean": plan_euclidean,
                                  "Performance": plan_performance, "others": plan_others,
                                  "learned": plan_learned_start}

__all__ = ["COS_MODES", "DEFAULT_WEIGHT_NORM", "DIRECTIONS", "SCORE_SPACES", "WEIGHTINGS", "WEIGHT_NORMS", "Plan",
           "Planner", "Weighting", "check_temperature", "comparable_scores", "effective_sources",
           "cosine_by_group", "distance_by_group", "group_softmax_weights", "keep_top_k", "metric_direction",
           "read_devall_tsv", "read_similarity_tsv", "softmax_weights"]
