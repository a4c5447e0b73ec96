"""Euclidean: w_s ∝ softmax(-‖θ_s - θ_s^{tuned on t}‖₂ / T), how far a source moves when tuned on the target."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from unit_model.config import FusionConfig
from unit_model.sources import Module, ModuleCache
from unit_model.weightings.base import (
    Plan,
    Weighting,
    groups_of,
    plans_from_module_scores,
    require,
    score_vectors,
)


def distance_by_group(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], granularity: str = "model"
) -> dict[str, float]:
    """‖a - b‖₂ of the flattened parameters of each group."""
    return {
        g: math.sqrt(math.fsum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in keys))
        for g, keys in groups_of(a, granularity).items()
    }


class DistanceScores:
    """‖θ_s - θ_s^{tuned on t}‖₂ per group."""

    def __init__(self, config: FusionConfig, cache: ModuleCache):
        self.config, self.cache = config, cache
        self.tuned: dict[tuple[str, str], Module] = {}

    def prepare(self, plans: list[Plan]) -> None:
        root = Path(require(self.config, "tuneall_ckpt_path"))
        for p in plans:
            for s in p.sources:
                self.tuned[p.target, s] = self.cache.open(root / p.target / s,
                                                          f"source {s!r} tuned on {p.target!r}", s)

    def __call__(self, plan: Plan, i: int) -> dict[str, float]:
        space = self.config.score_space
        tuned = score_vectors(self.tuned[plan.target, plan.sources[i]], space)
        return distance_by_group(score_vectors(plan.modules[i], space), tuned, self.config.granularity)


def plan_euclidean(config: FusionConfig, tasks: list[str], cache: ModuleCache) -> Weighting:
    return Weighting(plans_from_module_scores(config, tasks, cache, DistanceScores(config, cache), "lower",
                                              "distance"))
