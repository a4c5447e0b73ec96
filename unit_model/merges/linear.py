"""``linear``: the weighted sum Σ_s w_s τ_s (with softmax weights, a weighted average)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unit_model.merges.base import MergeOperator


def weighted_sum(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = torch.zeros_like(vectors[0], dtype=torch.float64)
    for v, w in zip(vectors, weights, strict=True):
        total.add_(v.to(torch.float64), alpha=float(w))
    return total


LINEAR = MergeOperator("linear", weighted_sum, "weighted sum of the task vectors (the paper's average)", linear=True)
