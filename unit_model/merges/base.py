"""What a merge operator is: a rule that combines the sources' task vectors of one tensor into one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# combine(vectors, weights) -> merged: one tensor's task vectors (float64, one per source, same shape) and
# the sources' weights for that tensor's parameter group.
Combine = Callable[[Sequence[torch.Tensor], Sequence[float]], torch.Tensor]


@dataclass(frozen=True)
class MergeOperator:
    name: str
    combine: Combine
    summary: str
    # True when combine is Σ w·τ: the driver then adds one source at a time into an accumulator instead of
    # holding every source's copy of a tensor at once.
    linear: bool = False
