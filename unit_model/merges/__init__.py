"""Merge operators behind one registry: how the sources' task vectors become the fused module.

To add one: write ``unit_model/merges/<name>.py`` with a ``combine(vectors, weights)`` function wrapped in a
``MergeOperator``, and register it on the ``MERGES`` line below. Each operator sees one tensor at a time: a
parameter tensor, or (for methods with low-rank factors) one pair's ΔW, which the driver factors back.
"""

from __future__ import annotations

from unit_model.merges.base import MergeOperator
from unit_model.merges.linear import LINEAR
from utils.errors import UserInputError

MERGES: dict[str, MergeOperator] = {m.name: m for m in (LINEAR,)}
DEFAULT_MERGE = "linear"

__all__ = ["DEFAULT_MERGE", "MERGES", "MergeOperator", "get_merge"]


def get_merge(name: str) -> MergeOperator:
    if name not in MERGES:
        raise UserInputError(f"--merge: expected one of {', '.join(MERGES)}, found {name!r}")
    return MERGES[name]
