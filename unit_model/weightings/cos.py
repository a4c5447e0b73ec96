"""cos: w_s ∝ softmax(cos(θ_t^few-shot, θ_s) / T), θ_t^few-shot tuned from random init on the target's split."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from unit_model.config import COS_MODES, FusionConfig
from unit_model.sources import Module, ModuleCache
from unit_model.weightings.base import (
    Plan,
    Weighting,
    groups_of,
    plans_from_module_scores,
    require,
    score_vectors,
)
from utils.errors import UserInputError


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


class CosScores:
    """cos(θ_t^few-shot, θ_s) per group; the target module is loaded once per target."""

    def __init__(self, config: FusionConfig, cache: ModuleCache):
        self.config, self.cache = config, cache
        self.targets: dict[str, Module] = {}
        self.loaded: tuple[str, dict[str, torch.Tensor]] | None = None

    def prepare(self, plans: list[Plan]) -> None:
        root = Path(require(self.config, "random_tuned_ckpt_path"))
        for p in plans:
            self.targets[p.target] = self.cache.open(root / p.target, f"random-tuned module of {p.target!r}",
                                                     p.target)

    def __call__(self, plan: Plan, i: int) -> dict[str, float]:
        if self.loaded is None or self.loaded[0] != plan.target:
            self.loaded = None  # drop the previous target first: two modules at most
            self.loaded = (plan.target, score_vectors(self.targets[plan.target], self.config.score_space))
        return cosine_by_group(self.loaded[1], score_vectors(plan.modules[i], self.config.score_space),
                               self.config.granularity, self.config.cos_mode)


def plan_cos(config: FusionConfig, tasks: list[str], cache: ModuleCache) -> Weighting:
    return Weighting(plans_from_module_scores(config, tasks, cache, CosScores(config, cache), "higher", "cosine"))
