"""Learned fusion weights: one weight per source (per group at block or layer granularity), searched to
minimise the merged module's cross-entropy on the target's few-shot *train* split plus an L1 term.

The search follows LoraHub's (facts from its public code): Nevergrad's ``NGOpt``, 40 evaluations, weights
bounded in [-1.5, 1.5], objective = mean cross-entropy + 0.05 · mean |w|. Two differences: the merge is this
project's (LoRA exactly in ΔW space, no B_i·A_j cross terms; any merge operator), and the search may start
from zeros (LoraHub's), uniform weights, or the weights of a similarity weighting ("start from Loss's weights,
then refine"). The weights are used as found (they need not sum to 1). Only the train split is read.

``optimizer = "gradient"`` replaces the search by Adam on the weights through a differentiable linear merge
(``merging.linear_merge_graph``), ``budget`` steps of one forward and backward pass each, each step projected
back into the bounds; the weights kept are those of the lowest objective seen. Only the linear operators have a
gradient (TIES and DARE trim, elect signs and drop entries). For LoRA the objective is that of the exact merged
ΔW; the module written is its best rank-r factors, as for every other fusion.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from unit_model.config import OPTIMIZERS
from unit_model.weightings.base import Plan
from utils.errors import UserInputError
from utils.progress import progress_bar

GradientObjective = Callable[[Plan, torch.Tensor, list[str]], torch.Tensor]  # (plan, weights, groups) -> loss


@dataclass(frozen=True)
class SearchSettings:
    budget: int = 40
    bound: float = 1.5
    l1: float = 0.05
    seed: int = 0
    optimizer: str = "nevergrad"
    lr: float = 0.05  # gradient only: Adam's step size on the weights

    def check(self) -> SearchSettings:
        if not isinstance(self.budget, int) or self.budget <= 0:
            raise UserInputError(f"--budget: expected a positive number of evaluations, found {self.budget!r}")
        if not math.isfinite(self.bound) or self.bound <= 0:
            raise UserInputError(f"--bound: expected a positive number, found {self.bound!r}")
        if not math.isfinite(self.l1) or self.l1 < 0:
            raise UserInputError(f"--l1: expected zero or a positive number, found {self.l1!r}")
        if self.optimizer not in OPTIMIZERS:
            raise UserInputError(f"--optimizer: expected one of {', '.join(OPTIMIZERS)}, found {self.optimizer!r}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise UserInputError(f"--search_lr: expected a positive number, found {self.lr!r}")
        return self


def learn_weights(plans: list[Plan], settings: SearchSettings,
                  fuse_plan: Callable[[Plan, dict[str, dict[str, float]]], dict[str, torch.Tensor]],
                  train_loss: Callable[[str, dict[str, torch.Tensor]], float],
                  gradient_loss: GradientObjective | None = None) -> None:
    """Replace each plan's weights by the searched ones; ``plan.search`` keeps every evaluation's objective.

    ``fuse_plan`` and ``train_loss`` serve the Nevergrad search; ``gradient_loss`` (the train loss of the plan's
    differentiable merge under a weights tensor) serves ``optimizer = "gradient"``."""
    if settings.optimizer == "gradient":
        if gradient_loss is None:
            raise ValueError("learn_weights: the gradient optimizer needs gradient_loss")
        return _descend(plans, settings, gradient_loss)
    import nevergrad as ng

    bar = progress_bar(total=len(plans) * settings.budget, desc="learned weights (train split)", leave=False)
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


def _descend(plans: list[Plan], settings: SearchSettings, gradient_loss: GradientObjective) -> None:
    """Projected Adam on each plan's weights; the best objective's weights are kept (the start included)."""
    bar = progress_bar(total=len(plans) * settings.budget, desc="learned weights (train split, gradient)", leave=False)
    for plan in plans:
        groups = sorted(next(iter(plan.weights.values())))
        start = [[plan.weights[s][g] for g in groups] for s in plan.sources]
        x = torch.tensor(start, dtype=torch.float64).clamp(-settings.bound, settings.bound).requires_grad_()
        optimizer = torch.optim.Adam([x], lr=settings.lr)
        curve: list[tuple[int, float, float]] = []
        best, best_x = math.inf, x.detach().clone()
        for step in range(1, settings.budget + 1):
            optimizer.zero_grad()
            objective = gradient_loss(plan, x, groups) + settings.l1 * x.abs().mean()
            value = float(objective)
            if not math.isfinite(value):
                raise UserInputError(f"learned weights for {plan.target}: the train objective is {value} at step "
                                     f"{step}; lower --lr")
            if value < best:
                best, best_x = value, x.detach().clone()
            curve.append((step, value, best))
            objective.backward()
            optimizer.step()
            with torch.no_grad():
                x.clamp_(-settings.bound, settings.bound)
            bar.update()
        plan.weights = {s: {g: float(best_x[i, j]) for j, g in enumerate(groups)} for i, s in enumerate(plan.sources)}
        plan.search = curve
    bar.close()
