"""Paired comparisons: the figures are scipy's own, recomputed here on hand-made cells."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import bootstrap, wilcoxon

from unit_model.comparison import paired_comparison

RANDOM = [0.50, 0.40, 0.70, 0.20, 0.90, 0.30]
FUSED = [0.80, 0.40, 0.65, 0.60, 0.95, 0.70]


def test_gain_ci_wins_and_wilcoxon_are_scipys() -> None:
    result = paired_comparison(FUSED, RANDOM, seed=3)
    diffs = np.array(FUSED) - np.array(RANDOM)
    assert result.cells == 6 and result.mean_gain == pytest.approx(diffs.mean())
    assert (result.wins, result.ties, result.losses) == (4, 1, 1)  # +.3, 0, -.05, +.4, +.05, +.4
    ci = bootstrap((diffs,), np.mean, confidence_level=0.95, n_resamples=10_000, method="BCa",
                   random_state=np.random.default_rng(3)).confidence_interval
    assert (result.ci_low, result.ci_high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert result.ci_low < result.mean_gain < result.ci_high
    assert result.wilcoxon_p == pytest.approx(wilcoxon(diffs).pvalue)
    assert result == paired_comparison(FUSED, RANDOM, seed=3)  # seeded: the same figures every run


def test_degenerate_cells_give_unknowns_not_numbers() -> None:
    same = paired_comparison([0.5, 0.6], [0.5, 0.6])
    assert (same.mean_gain, same.ci_low, same.ci_high, same.ties, same.wilcoxon_p) == (0.0, 0.0, 0.0, 2, None)
    assert not same.ci_excludes_zero
    one = paired_comparison([0.9], [0.5])
    assert one.ci_low is None and one.ci_high is None and one.wins == 1
    shifted = paired_comparison([0.6, 0.7, 0.8], [0.5, 0.6, 0.7])  # the same gain everywhere: a zero-width CI
    assert shifted.ci_low == pytest.approx(0.1) and shifted.ci_excludes_zero
    with pytest.raises(ValueError, match="2 method scores against 3"):
        paired_comparison([0.1, 0.2], [0.1, 0.2, 0.3])
