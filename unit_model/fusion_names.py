"""The study's fusion names: ``WEIGHTING[:START][+OPERATOR][@original]``, parsed in one place into a ``Fusion``.

* ``WEIGHTING`` is an entry of the weighting table (``unit_model/weightings/``: ``average``, ``manual``, ``cos``,
  ``Euclidean``, ``Performance``, ``learned``) or a similarity metric of the metric registry;
* ``:START`` only follows a weighting that learns its weights: where the search starts (``zeros`` by default,
  ``uniform`` or a metric);
* ``+OPERATOR`` is a merge operator of unit_model/merges/ (``linear`` by default);
* ``@original`` weights as the original code did: raw scores (``weight_norm none``) at the weighting's original
  temperature, so ``Loss`` and ``Loss@original`` compare the two weight rules on the same sources, splits and
  budgets.

A ``Fusion`` carries the weighting's table entry and the merge operator themselves: what reads a fusion name
asks them, never the name's text again.
"""

from __future__ import annotations

from dataclasses import dataclass

from unit_model.config import SEARCH_STARTS
from unit_model.merges import MERGES, MergeOperator
from unit_model.weightings import WeightingSpec, get_weighting, metric_names, study_weightings
from utils.errors import UserInputError

ORIGINAL = "@original"


@dataclass(frozen=True)
class Fusion:
    name: str
    weighting: WeightingSpec
    operator: MergeOperator
    start: str | None  # a learned weighting only: zeros | uniform | a similarity metric
    original: bool  # raw scores at the weighting's original temperature

    @property
    def reads(self) -> WeightingSpec:
        """The weighting whose inputs this fusion reads (a learned one started from a metric reads the metric's)."""
        return get_weighting(self.start) if self.start not in (None, *SEARCH_STARTS) else self.weighting

    @property
    def inputs(self) -> tuple[str, ...]:
        """The study outputs it reads (keys of unit_model.weightings.STUDY_INPUTS)."""
        return tuple(dict.fromkeys((*self.weighting.inputs, *self.reads.inputs)))


def parse_fusion(name: str, flag: str = "--fusions") -> Fusion:
    """``Loss+ties@original`` -> Fusion(weighting=Loss's entry, operator=TIES, original=True); a clear error for
    a name outside the grammar."""
    rest, at, suffix = name.partition("@")
    if at and f"@{suffix}" != ORIGINAL:
        raise UserInputError(f"{flag}: {name!r} ends in @{suffix}; the only suffix is {ORIGINAL}")
    method, _, operator = rest.partition("+")
    operator = operator or "linear"
    method, colon, start = method.partition(":")
    names = study_weightings()
    if method not in names:
        raise UserInputError(f"{flag}: unknown fusion method {method!r} in {name!r}; expected some of "
                             f"{', '.join(sorted(names))}, each optionally +OPERATOR")
    spec = get_weighting(method)
    if spec.learns_weights:
        start = start or "zeros"
        if start not in (*SEARCH_STARTS, *metric_names()):
            raise UserInputError(f"{flag}: {name!r} starts from {start!r}; expected {method}, {method}:uniform or "
                                 f"{method}:METRIC with a metric of {', '.join(metric_names())}")
    elif colon:
        raise UserInputError(f"{flag}: {name!r}: only a learned weighting takes a start (learned:METRIC)")
    else:
        start = None
    if operator not in MERGES:
        raise UserInputError(f"{flag}: unknown merge operator {operator!r} in {name!r}; expected one of "
                             f"{', '.join(MERGES)}")
    original = bool(at)
    if original and spec.original_temperature is None:
        with_t = [n for n in names if get_weighting(n).original_temperature is not None]
        raise UserInputError(f"{flag}: {name!r}: {ORIGINAL} applies to a weighting with a temperature "
                             f"({', '.join(with_t)}), not to {method}")
    return Fusion(name=name, weighting=spec, operator=MERGES[operator], start=start, original=original)
