"""Paired comparison of a fusion method against random initialisation over the same (target, seed) cells.

A gain is reported with what a reader needs to trust it: the mean paired difference, its 95% bootstrap
confidence interval (``scipy.stats.bootstrap`` over the cells' differences, BCa), wins / ties / losses, and
the Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon``). Nothing here is hand-written statistics.
Unknown stays unknown: a test that cannot be run (too few cells, every difference zero) gives None, shown
as "-". (The module is not called statistics.py: a script run as a file from unit_model/ would import it
in place of the standard library's.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TIE_TOLERANCE = 1e-9  # scores are written with 4+ decimals: closer than this is the same score


@dataclass(frozen=True)
class PairedComparison:
    cells: int
    mean_gain: float
    ci_low: float | None
    ci_high: float | None
    wins: int
    ties: int
    losses: int
    wilcoxon_p: float | None

    @property
    def ci_excludes_zero(self) -> bool:
        return self.ci_low is not None and self.ci_high is not None and (self.ci_low > 0 or self.ci_high < 0)


def paired_comparison(method: Sequence[float], baseline: Sequence[float], *, confidence: float = 0.95,
                      resamples: int = 10_000, seed: int = 0) -> PairedComparison:
    """``method[i]`` against ``baseline[i]``: the same cell (target, seed) under two initialisations."""
    if len(method) != len(baseline):
        raise ValueError(f"paired_comparison: {len(method)} method scores against {len(baseline)} baseline scores")
    if not method:
        raise ValueError("paired_comparison: no cells")
    diffs = np.asarray(method, dtype=float) - np.asarray(baseline, dtype=float)
    if not np.isfinite(diffs).all():
        raise ValueError("paired_comparison: a score is not a finite number")
    wins = int((diffs > TIE_TOLERANCE).sum())
    losses = int((diffs < -TIE_TOLERANCE).sum())
    low = high = None
    if len(diffs) >= 2:
        if np.ptp(diffs) <= TIE_TOLERANCE:  # every cell gained the same: no spread to resample
            low = high = float(diffs.mean())
        else:
            from scipy.stats import bootstrap

            ci = bootstrap((diffs,), np.mean, confidence_level=confidence, n_resamples=resamples,
                           method="BCa", random_state=np.random.default_rng(seed)).confidence_interval
            if math.isfinite(ci.low) and math.isfinite(ci.high):
                low, high = float(ci.low), float(ci.high)
    p = None
    if wins + losses > 0:
        from scipy.stats import wilcoxon

        p = float(wilcoxon(diffs, zero_method="wilcox").pvalue)
    return PairedComparison(len(diffs), float(diffs.mean()), low, high, wins, len(diffs) - wins - losses, losses, p)
