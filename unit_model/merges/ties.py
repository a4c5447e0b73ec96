"""``ties`` (TIES-Merging) and ``magnitude_prune``: trim each task vector to its top ``density`` fraction by
magnitude; TIES then elects a sign per entry and averages the sources that agree, magnitude_prune sums."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a function needs it: the module loads without it
    import torch

from unit_model.merges.base import (
    DENSITY,
    MAJORITY_SIGN,
    MergeOperator,
    MergeSettings,
    elect_and_merge,
    trim,
    weighted_sum,
)


def ties(vectors: Sequence[torch.Tensor], weights: Sequence[float], settings: MergeSettings, key: str) -> torch.Tensor:
    return elect_and_merge([trim(v, settings.density) for v in vectors], weights, settings.majority_sign)


def magnitude_prune(vectors: Sequence[torch.Tensor], weights: Sequence[float], settings: MergeSettings,
                    key: str) -> torch.Tensor:
    return weighted_sum([trim(v, settings.density) for v in vectors], weights)


TIES = MergeOperator("ties", ties, "trim to the top --density by magnitude, elect signs, weighted disjoint mean",
                     settings=(DENSITY, MAJORITY_SIGN))
MAGNITUDE_PRUNE = MergeOperator("magnitude_prune", magnitude_prune,
                                "trim to the top --density by magnitude, then the weighted sum", settings=(DENSITY,))
