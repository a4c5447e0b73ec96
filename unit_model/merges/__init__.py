"""Merge operators behind one registry: how the sources' task vectors become the fused module.

To add one: write ``unit_model/merges/<name>.py`` with a ``combine(vectors, weights, settings, key)`` function
wrapped in a ``MergeOperator``, and register it on the ``MERGES`` line below. Each operator sees one tensor
at a time: a parameter tensor's task vector, or (for methods with low-rank factors) one pair's ΔW, which the
driver factors back.
"""

from __future__ import annotations

from unit_model.merges.base import MAJORITY_SIGNS, MergeOperator, MergeSettings
from unit_model.merges.dare import DARE_LINEAR, DARE_TIES
from unit_model.merges.linear import LINEAR, TASK_ARITHMETIC
from unit_model.merges.ties import MAGNITUDE_PRUNE, TIES
from utils.errors import UserInputError

MERGES: dict[str, MergeOperator] = {m.name: m for m in (LINEAR, TASK_ARITHMETIC, TIES, DARE_LINEAR, DARE_TIES,
                                                        MAGNITUDE_PRUNE)}
DEFAULT_MERGE = "linear"

__all__ = ["DEFAULT_MERGE", "MAJORITY_SIGNS", "MERGES", "MergeOperator", "MergeSettings", "check_settings",
           "get_merge"]


def get_merge(name: str) -> MergeOperator:
    if name not in MERGES:
        raise UserInputError(f"--merge: expected one of {', '.join(MERGES)}, found {name!r}")
    return MERGES[name]


def check_settings(settings: MergeSettings) -> MergeSettings:
    """The operators' parameters as one-line errors naming the flag."""
    import math

    if not 0 < settings.density <= 1:
        raise UserInputError(f"--density: expected a fraction in (0, 1], found {settings.density!r}")
    if not math.isfinite(settings.lam):
        raise UserInputError(f"--lam: expected a finite number, found {settings.lam!r}")
    if settings.majority_sign not in MAJORITY_SIGNS:
        raise UserInputError(f"--majority_sign: expected one of {', '.join(MAJORITY_SIGNS)}, found "
                             f"{settings.majority_sign!r}")
    return settings
