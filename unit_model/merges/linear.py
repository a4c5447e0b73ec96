"""``linear``: the weighted sum Σ_s w_s τ_s (with softmax weights, a weighted average) and ``task_arithmetic``,
λ·Σ_s w_s τ_s, whose weights need not sum to 1 (λ is ``--lam``, which the driver applies to every operator)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a function needs it: the module loads without it
    import torch

from unit_model.merges.base import MergeOperator, MergeSettings, weighted_sum


def linear(vectors: Sequence[torch.Tensor], weights: Sequence[float], settings: MergeSettings,
           key: str) -> torch.Tensor:
    return weighted_sum(vectors, weights)


LINEAR = MergeOperator("linear", linear, "weighted sum of the task vectors (the paper's average)", linear=True)
TASK_ARITHMETIC = MergeOperator("task_arithmetic", linear, "λ · Σ w τ: task arithmetic, scaled by --lam", linear=True)
