"""``dare_linear`` and ``dare_ties`` (DARE): drop each entry of each task vector with probability 1 - density
and rescale the kept ones by 1/density, then the weighted sum, or TIES's sign election and disjoint mean.
The drops are drawn from --merge_seed and the tensor's name, so a run is reproducible."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a function needs it: the module loads without it
    import torch

from unit_model.merges.base import (
    DENSITY,
    MAJORITY_SIGN,
    MergeOperator,
    MergeSetting,
    MergeSettings,
    drop,
    elect_and_merge,
    weighted_sum,
)
from utils.ranges import ANY_INT

MERGE_SEED = MergeSetting("merge_seed", 0, "dare_*: seed of the random drops (with each tensor's name)", ANY_INT)


def dropped(vectors: Sequence[torch.Tensor], settings: MergeSettings, key: str) -> list[torch.Tensor]:
    import torch

    generator = settings.generator(key)
    return [drop(v.to(torch.float64), settings.density, generator) for v in vectors]


def dare_linear(vectors: Sequence[torch.Tensor], weights: Sequence[float], settings: MergeSettings,
                key: str) -> torch.Tensor:
    return weighted_sum(dropped(vectors, settings, key), weights)


def dare_ties(vectors: Sequence[torch.Tensor], weights: Sequence[float], settings: MergeSettings,
              key: str) -> torch.Tensor:
    return elect_and_merge(dropped(vectors, settings, key), weights, settings.majority_sign)


DARE_LINEAR = MergeOperator("dare_linear", dare_linear, "random drops at 1 - --density, rescaled, weighted sum",
                            settings=(DENSITY, MERGE_SEED))
DARE_TIES = MergeOperator("dare_ties", dare_ties, "random drops at 1 - --density, rescaled, then TIES's election",
                          settings=(DENSITY, MAJORITY_SIGN, MERGE_SEED))
