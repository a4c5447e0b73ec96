"""Merge operators behind one registry: how the sources' task vectors become the fused module.

To add one: write ``unit_model/merges/<name>.py`` with a ``combine(vectors, weights, settings, key)`` function
wrapped in a ``MergeOperator`` that lists the ``MergeSetting`` declarations it reads, and register it on the
``MERGES`` line below. A new setting is declared once, beside its operator: the fusion flags, their help and
checks, the fused modules' metadata and the study's parameters all come from ``MERGE_SETTINGS``. Each operator
sees one tensor at a time: a parameter tensor's task vector, or (for methods with low-rank factors) one pair's
ΔW, which the driver factors back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from unit_model.merges.base import LAM, MAJORITY_SIGNS, MergeOperator, MergeSetting, MergeSettings
from unit_model.merges.dare import DARE_LINEAR, DARE_TIES
from unit_model.merges.linear import LINEAR, TASK_ARITHMETIC
from unit_model.merges.ties import MAGNITUDE_PRUNE, TIES
from utils.errors import UserInputError

MERGES: dict[str, MergeOperator] = {m.name: m for m in (LINEAR, TASK_ARITHMETIC, TIES, DARE_LINEAR, DARE_TIES,
                                                        MAGNITUDE_PRUNE)}
DEFAULT_MERGE = "linear"

__all__ = ["DEFAULT_MERGE", "MAJORITY_SIGNS", "MERGES", "MERGE_SETTINGS", "MergeOperator", "MergeSetting",
           "MergeSettings", "declared_settings", "get_merge", "merge_settings_from"]


def declared_settings() -> dict[str, MergeSetting]:
    """Every merge setting: the driver's ``lam``, then each operator's in registry order (each name once)."""
    declared = {LAM.name: LAM}
    for op in MERGES.values():
        for s in op.settings:
            if declared.setdefault(s.name, s) is not s:
                raise ValueError(f"merge setting {s.name!r} is declared twice (by {op.name} and another operator)")
    return declared


MERGE_SETTINGS: dict[str, MergeSetting] = declared_settings()


def get_merge(name: str | MergeOperator, flag: str = "--merge") -> MergeOperator:
    if isinstance(name, MergeOperator):
        return name
    if name not in MERGES:
        raise UserInputError(f"{flag}: expected one of {', '.join(MERGES)}, found {name!r}")
    return MERGES[name]


def merge_settings_from(values: Mapping[str, Any]) -> MergeSettings:
    """The declared settings' values out of ``values`` (a script's or the study's parameters), each checked
    against its declaration (a one-line error naming its flag); missing ones take their default."""
    picked = {name: values[name] for name in MERGE_SETTINGS if name in values}
    for name, value in picked.items():
        MERGE_SETTINGS[name].check(value)
    return MergeSettings({name: picked.get(name, s.default) for name, s in MERGE_SETTINGS.items()})
