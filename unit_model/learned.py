"""Learned fusion weights: one weight per source (per group at block or layer granularity), searched to
minimise the merged module's cross-entropy on the target's few-shot *train* split plus an L1 term.

The search follows LoraHub's (facts from its public code): Nevergrad's ``NGOpt``, 40 evaluations, weights
bounded in [-1.5, 1.5], objective = mean cross-entropy + 0.05 · mean |w|. Two differences: the merge is this
project's (LoRA exactly in ΔW space, no B_i·A_j cross terms; any merge operator), and the search may start
from zeros (LoraHub's), uniform weights, or the weights of a similarity weighting ("start from Loss's weights,
then refine"). The weights are used as found (they need not sum to 1). Only the train split is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from unit_model.weightings import Plan
from utils.errors import UserInputError

LEARNED_STARTS = ("zeros", "uniform")  # or a metric of --result_tsv: its softmax weights


@dataclass(frozen=True)
class SearchSettings:
    budget: int = 40
    bound: float = 1.5
    l1: float = 0.05
    seed: int = 0

    def check(self) -> SearchSettings:
        if not isinstance(self.budget, int) or self.budget <= 0:
            raise UserInputError(f"--budget: expected a positive number of evaluations, found {self.budget!r}")
        if not math.isfinite(self.bound) or self.bound <= 0:
            raise UserInputError(f"--bound: expected a positive number, found {self.bound!r}")
        if not math.isfinite(self.l1) or self.l1 < 0:
            raise UserInputError(f"--l1: expected zero or a positive number, found {self.l1!r}")
        return self


def learn_weights(plans: list[Plan], settings: SearchSettings,
                  fuse_plan: Callable[[Plan, dict[str, dict[str, float]]], dict[str, torch.Tensor]],
                  train_loss: Callable[[str, dict[str, torch.Tensor]], float]) -> None:
    """Replace each plan's weights by the searched ones; ``plan.search`` keeps every evaluation's objective."""
    import nevergrad as ng

    bar = tqdm(total=len(plans) * settings.budget, desc="learned weights (train split)", leave=False)
    for plan in plans:
        groups = sorted(next(iter(plan.weights.values())))
        start = np.array([[plan.weights[s][g] for g in groups] for s in plan.sources], dtype=float)
        start = np.clip(start, -settings.bound, settings.bound)

        def as_weights(x: np.ndarray, plan: Plan = plan, groups: list[str] = groups) -> dict[str, dict[str, float]]:
            return {s: {g: float(x[i, j]) for j, g in enumerate(groups)} for i, s in enumerate(plan.sources)}

        def objective(x: np.ndarray, plan: Plan = plan) -> float:
            return train_loss(plan.target, fuse_plan(plan, as_weights(x))) + settings.l1 * float(np.abs(x).mean())

        parametrization = ng.p.Array(init=start, lower=-settings.bound, upper=settings.bound)
        parametrization.random_state = np.random.RandomState(settings.seed)
        optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=settings.budget)
        curve: list[tuple[int, float, float]] = []
        best = math.inf
        for evaluation in range(1, settings.budget + 1):
            candidate = optimizer.ask()
            value = objective(candidate.value)
            optimizer.tell(candidate, value)
            best = min(best, value)
            curve.append((evaluation, value, best))
            bar.update()
        plan.weights = as_weights(optimizer.provide_recommendation().value)
        plan.search = curve
    bar.close()
