"""The study's fusion names: ``WEIGHTING[:START][+OPERATOR][@original]``, parsed in one place.

* ``WEIGHTING`` is a weighting of the paper (``average``, ``manual``, ``cos``, ``Euclidean``, ``Performance``, a
  similarity metric) or ``learned`` (weights searched on the target's train split, unit_model/learned.py);
* ``:START`` only follows ``learned``: where the search starts (``zeros`` by default, ``uniform`` or a metric);
* ``+OPERATOR`` is a merge operator of unit_model/merges/ (``linear`` by default);
* ``@original`` weights as the original code did: raw scores (``weight_norm none``) at its per-method temperature,
  so ``Loss`` and ``Loss@original`` compare the two weight rules on the same sources, splits and budgets.
"""

from __future__ import annotations

from dataclasses import dataclass

from utils.errors import UserInputError

SIMILARITY_METRICS = ("Loss", "KL", "EL2N", "LogitsCos", "GraNd")
WEIGHTINGS = ("average", "manual", "cos", "Euclidean", "Performance", *SIMILARITY_METRICS, "learned")
UNIFORM = ("average", "manual")  # weightings whose weights carry no ranking
LEARNED_STARTS = ("zeros", "uniform", *SIMILARITY_METRICS)
# The original code's softmax temperatures on raw scores: 0.1 for the similarity metrics and Euclidean, 0.001 for
# the Performance gain and for cosine.
ORIGINAL_TEMPERATURES = {**dict.fromkeys(SIMILARITY_METRICS, 0.1), "Euclidean": 0.1, "Performance": 0.001,
                         "cos": 0.001}
ORIGINAL = "@original"


@dataclass(frozen=True)
class Fusion:
    name: str
    weighting: str  # one of WEIGHTINGS
    operator: str  # a merge operator's name
    start: str | None  # learned only: zeros | uniform | a similarity metric
    original: bool  # raw scores at ORIGINAL_TEMPERATURES[weighting]

    @property
    def reads(self) -> str:
        """The weighting whose inputs this fusion reads (a learned one started from a metric reads the metric's)."""
        return self.start if self.start in SIMILARITY_METRICS else self.weighting

    @property
    def ranks_sources(self) -> bool:
        """Whether its weights order the sources (those of average and manual are uniform)."""
        return self.weighting not in UNIFORM


def fusion_file_name(name: str) -> str:
    """A fusion's folder and file name: its name with ':' (not allowed in Windows file names) spelled out, so
    ``learned:Loss`` lives in ``learned_from_Loss``."""
    return name.replace(":", "_from_")


def parse_fusion(name: str, operators: tuple[str, ...] | None = None, flag: str = "--fusions") -> Fusion:
    """``Loss+ties@original`` -> Fusion(weighting="Loss", operator="ties", original=True); a clear error for a
    name outside the grammar. ``operators`` (the merge registry's names) is checked when given."""
    rest, at, suffix = name.partition("@")
    if at and f"@{suffix}" != ORIGINAL:
        raise UserInputError(f"{flag}: {name!r} ends in @{suffix}; the only suffix is {ORIGINAL}")
    weighting, _, operator = rest.partition("+")
    operator = operator or "linear"
    weighting, colon, start = weighting.partition(":")
    if weighting not in WEIGHTINGS:
        raise UserInputError(f"{flag}: unknown fusion method {weighting!r} in {name!r}; expected some of "
                             f"{', '.join(sorted(WEIGHTINGS))}, each optionally +OPERATOR")
    if weighting == "learned":
        start = start or "zeros"
        if start not in LEARNED_STARTS:
            raise UserInputError(f"{flag}: {name!r} starts from {start!r}; expected learned, learned:uniform or "
                                 f"learned:METRIC with a metric of {', '.join(SIMILARITY_METRICS)}")
    elif colon:
        raise UserInputError(f"{flag}: {name!r}: only learned takes a start (learned:METRIC)")
    else:
        start = None
    if operators is not None and operator not in operators:
        raise UserInputError(f"{flag}: unknown merge operator {operator!r} in {name!r}; expected one of "
                             f"{', '.join(operators)}")
    original = bool(at)
    if original and weighting not in ORIGINAL_TEMPERATURES:
        raise UserInputError(f"{flag}: {name!r}: {ORIGINAL} applies to a weighting with a temperature "
                             f"({', '.join(ORIGINAL_TEMPERATURES)}), not to {weighting}")
    return Fusion(name=name, weighting=weighting, operator=operator, start=start, original=original)
