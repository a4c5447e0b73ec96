"""``--tem auto``: each target's softmax temperature chosen on its few-shot dev split, never on test.

For every target whose weights come from scores, each T of ``TEMPERATURE_GRID`` gives weights, the weights
give a fused module, and the fused module is scored zero-shot (no tuning) on the target's dev split with
the task's metric. The T with the best dev score is kept; a tie goes to the larger T, whose weights are
closer to uniform (the choice that trusts the scores least). Only the dev split is read: the test split
of a target is never opened here, so it cannot leak into the choice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from unit_model.weightings.base import Plan, group_softmax_weights, keep_top_k
from utils.progress import progress_bar

TEMPERATURE_GRID = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)

FusePlan = Callable[[Plan, dict[str, dict[str, float]]], dict[str, torch.Tensor]]


def choose_temperatures(plans: list[Plan], weight_norm: str, fuse_plan: FusePlan,
                        score: Callable[[str, dict[str, torch.Tensor]], float],
                        grid: tuple[float, ...] = TEMPERATURE_GRID, top_k: int = 0) -> None:
    """Set each scored plan's weights, ``temperature`` and ``temperature_dev`` from the grid search (each T's
    weights cut to the ``top_k`` heaviest sources, as the fusion will)."""
    scored = [p for p in plans if p.scores is not None]
    bar = progress_bar(total=len(scored) * len(grid), desc="--tem auto (dev split)", leave=False,
               disable=len(scored) * len(grid) < 10)
    for plan in scored:
        dev: dict[float, float] = {}
        for temperature in grid:
            weights = keep_top_k(group_softmax_weights(plan.scores, plan.direction, temperature, plan.target,
                                                       weight_norm), top_k)
            dev[temperature] = score(plan.target, fuse_plan(plan, weights))
            bar.update()
        best = max(grid, key=lambda t: (dev[t], t))
        plan.weights = keep_top_k(group_softmax_weights(plan.scores, plan.direction, best, plan.target, weight_norm),
                                  top_k)
        plan.temperature, plan.temperature_dev = best, dev
    bar.close()
