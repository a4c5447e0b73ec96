"""Paired comparisons: the figures are scipy's own, recomputed here on hand-made cells."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import bootstrap, wilcoxon

from pipeline.comparison import paired_comparison

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


# ---- independent checks: not the same scipy call with the same arguments


def test_the_ci_agrees_with_a_hand_written_percentile_bootstrap() -> None:
    """On symmetric cells BCa's bias and acceleration corrections are small: its interval is the percentile
    interval of the resampled means, computed here from fixed resamples with plain numpy, within a few percent
    of the spread."""
    rng = np.random.default_rng(11)
    diffs = rng.normal(0.05, 0.1, size=40)
    result = paired_comparison(list(diffs), [0.0] * len(diffs), resamples=20_000, seed=5)
    draws = np.random.default_rng(7).integers(0, len(diffs), size=(20_000, len(diffs)))
    means = diffs[draws].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    spread = high - low
    assert abs(result.ci_low - low) < 0.05 * spread and abs(result.ci_high - high) < 0.05 * spread
    # and both are near the normal-theory interval mean ± 1.96 s / sqrt(n)
    half = 1.96 * diffs.std(ddof=1) / np.sqrt(len(diffs))
    assert abs(result.ci_low - (diffs.mean() - half)) < 0.1 * spread
    assert abs(result.ci_high - (diffs.mean() + half)) < 0.1 * spread


@pytest.mark.slow
def test_the_ci_covers_the_true_gain_about_95_percent_of_the_time() -> None:
    """Planted cells: 300 studies of 15 normal cells with true gain 0.05; the 95% interval should hold 0.05 in
    about 95% of them (BCa on small samples runs a little under; binomial noise at n=300 is about 1.3%)."""
    rng = np.random.default_rng(2024)
    covered = 0
    studies = 300
    for i in range(studies):
        diffs = rng.normal(0.05, 0.1, size=15)
        result = paired_comparison(list(diffs), [0.0] * 15, resamples=2_000, seed=i)
        covered += result.ci_low <= 0.05 <= result.ci_high
    assert 0.88 <= covered / studies <= 0.99, covered / studies


def test_wilcoxon_p_by_hand_on_five_cells() -> None:
    """Five gains, all positive, no ties: the signed-rank statistic's exact null puts 1 of 2^5 sign patterns at
    the extreme on each side, so the two-sided p is 2/32."""
    result = paired_comparison([0.6, 0.7, 0.9, 0.8, 0.95], [0.5, 0.5, 0.5, 0.5, 0.5])
    assert result.wilcoxon_p == pytest.approx(2 / 32)
    # one loss of the smallest rank among five: 2 of 32 patterns are as extreme on each side, so p = 4/32
    mixed = paired_comparison([0.45, 0.7, 0.9, 0.8, 0.95], [0.5, 0.5, 0.5, 0.5, 0.5])
    assert mixed.wilcoxon_p == pytest.approx(4 / 32)
