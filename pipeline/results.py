"""A study's results computed from its folders: every cell, statistic and transferability figure, apart from how
they are shown (pipeline/report.py renders them as TSV, markdown, HTML and figures).

* ``{delta}/seed_{s}/iters_{n}/random/result.tsv`` and ``.../transfer/{fusion}/result.tsv``: the test score of
  each target on data seed s's split, tuned for n steps from random initialisation and from each fused
  initialisation (same split, budget, seed and selection rule);
* ``{delta}/seed_{s}/fused/{fusion}/weights.tsv``: the fusion weights on that split;
* ``{delta}/seed_{s}/pairs.tsv``: the test score of each target tuned from each single source.

Transferability of a fusion = how well its weights rank the single sources by the transfer they really give:
Spearman correlation between weight and single-source test score per target, and NDCG@3 with the test score as
relevance (ranking sources by gain or by score is the same within a target, and NDCG needs non-negative
relevance). Family precision@3 is the share of a target's three heaviest sources that come from its own family
(manual category). Only fusions whose weighting ranks sources (the weighting table says which) are validated.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from models.run_folders import read_result_tsv
from pipeline.comparison import PairedComparison, paired_comparison
from pipeline.layout import StudyLayout
from pipeline.validation import (
    EstimatorCell,
    EstimatorSummary,
    LabelWordShare,
    MemberGap,
    estimator_cells,
    label_word_shares,
    member_gaps,
    ndcg_at,
    summarise_estimators,
)
from unit_model.fusion_names import Fusion
from utils.io import read_tsv


def read_rows(path: Path, columns: list[str]) -> list[dict[str, str]]:
    return [row for _, row in read_tsv(path, columns)]


def test_scores(run_root: Path) -> dict[str, float]:
    """Best-dev run's test score per task of a tune.py output folder."""
    best: dict[str, tuple[float, float]] = {}
    for row in read_result_tsv(run_root / "result.tsv"):
        entry = (float(row["dev"]), float(row["test"]))
        if row["task"] not in best or entry[0] > best[row["task"]][0]:
            best[row["task"]] = entry
    return {t: test for t, (_, test) in best.items()}


def curve(run_root: Path, task: str) -> list[tuple[int, float]]:
    runs = sorted((run_root / task).glob("lr_*_bsz_*/curve.tsv"))
    return [(int(r["step"]), float(r["dev"])) for r in read_rows(runs[0], ["step", "dev"])] if runs else []


def fusion_weights(path: Path) -> dict[str, dict[str, float]]:
    """target -> source -> weight (the mean over groups when weights are per group)."""
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in read_rows(path, ["target", "source", "weight"]):
        sums[row["target"]][row["source"]].append(float(row["weight"]))
    return {t: {s: float(np.mean(w)) for s, w in by_source.items()} for t, by_source in sums.items()}


def mean_effective_sources(path: Path) -> float:
    """Mean over targets (and groups) of a fusion's effective number of sources, exp(entropy of its weights)."""
    if not path.is_file():
        return float("nan")
    per_target = {(row["target"], row.get("group", "")): float(row["effective_sources"])
                  for row in read_rows(path, ["target", "effective_sources"])}
    return float(np.mean(list(per_target.values())))


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def family_precision(weights: dict[str, float], target: str, categories: dict[str, str], k: int = 3) -> float:
    """Share of the k most weighted sources in the target's category, over those that have a category.

    Unknown is not a match: a target without a category, or top sources none of which has one, give NaN
    (shown as "-"), never the 1.0 that comparing two missing categories would give.
    """
    if target not in categories:
        return float("nan")
    top = [s for s in sorted(weights, key=lambda s: (-weights[s], s))[:k] if s in categories]
    if not top:
        return float("nan")
    return sum(categories[s] == categories[target] for s in top) / len(top)


@dataclass
class ArmTable:
    """One delta method at one budget: every arm's test score on every (target, data seed) cell, and each fusion
    against random initialisation over the same cells."""

    delta: str
    iters: int
    arms: list[str]  # "random", then the fusions in the order given
    scores: dict[str, dict[tuple[str, int], float]]  # arm -> (target, data seed) -> test score
    paired: dict[str, PairedComparison]  # fusion -> its paired comparison with random
    effective_sources: dict[str, float]  # fusion -> mean effective number of sources (NaN: unknown)
    # learning curves on the first data seed: arm -> target -> (step, dev score) points, random and the best fusion
    curves: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)

    def per_target(self, target: str, arm: str, data_seeds: list[int]) -> list[float]:
        return [self.scores[arm][(target, s)] for s in data_seeds]

    def means(self) -> np.ndarray:
        return np.array([np.mean(list(self.scores[a].values())) for a in self.arms])

    def gains(self) -> np.ndarray:
        means = self.means()
        return means - means[0]

    def ranks(self) -> list[int]:
        return [int(r) for r in rankdata(-np.round(self.means(), 6), method="min")]  # ties share the better rank


@dataclass(frozen=True)
class Transferability:
    """How well a fusion's weights rank the sources of one target on one split (data_seed None: the mean)."""

    delta: str
    fusion: str
    target: str
    data_seed: int | None
    spearman: float
    ndcg: float
    family_precision: float


@dataclass(frozen=True)
class PairScore:
    delta: str
    data_seed: int
    target: str
    source: str
    test: str  # as pairs.tsv holds it (full precision)
    gain: float  # over random init at the first budget


@dataclass
class StudyResults:
    deltas: list[str]
    targets: list[str]
    fusions: list[str]
    data_seeds: list[int]
    budgets: list[int]
    tables: list[ArmTable]
    transferability: list[Transferability]
    pairs: list[PairScore]
    estimator_cells: list[EstimatorCell] = field(default_factory=list)
    estimators: list[EstimatorSummary] = field(default_factory=list)
    member_gaps: list[MemberGap] = field(default_factory=list)
    label_words: list[LabelWordShare] = field(default_factory=list)


def arm_table(layout: StudyLayout, delta: str, iters: int, targets: list[str], fusions: list[str],
              data_seeds: list[int]) -> ArmTable:
    """The cells and paired comparisons of one delta method at one budget."""
    sides = {s: layout.side(delta, s) for s in data_seeds}
    roots = {"random": {s: sides[s].random(iters) for s in data_seeds}}
    roots.update({m: {s: sides[s].transfer(iters, m) for s in data_seeds} for m in fusions})
    read = {a: {s: test_scores(root) for s, root in by_seed.items()} for a, by_seed in roots.items()}
    scores = {a: {(t, s): read[a][s][t] for t in targets for s in data_seeds} for a in roots}
    cells = [(t, s) for t in targets for s in data_seeds]
    paired = {m: paired_comparison([scores[m][c] for c in cells], [scores["random"][c] for c in cells])
              for m in fusions}
    effective = {m: float(np.nanmean([mean_effective_sources(sides[s].weights(m)) for s in data_seeds]))
                 for m in fusions}
    table = ArmTable(delta, iters, ["random", *fusions], scores, paired, effective)
    if fusions:  # random against the best fusion (by mean test score), on the first data seed
        best = fusions[int(np.argmax(table.means()[1:]))]
        table.curves = {arm: {t: curve(roots[arm][data_seeds[0]], t) for t in targets} for arm in ("random", best)}
    return table


def read_weights(layout: StudyLayout, delta: str, fusions: list[str], data_seeds: list[int],
                 ) -> dict[str, dict[int, dict[str, dict[str, float]]]]:
    """Each fusion's weights on each split that has them, fusion -> data seed -> target -> source, read once for
    every figure that needs them."""
    return {f: {s: fusion_weights(layout.side(delta, s).weights(f)) for s in data_seeds
                if layout.side(delta, s).weights(f).is_file()} for f in fusions}


def transferability(layout: StudyLayout, delta: str, first_iters: int, targets: list[str], fusions: list[Fusion],
                    data_seeds: list[int], categories: dict[str, str],
                    weights: dict[str, dict[int, dict[str, dict[str, float]]]],
                    ) -> tuple[list[Transferability], list[PairScore], dict[int, dict[str, dict[str, float]]],
                               dict[int, dict[str, float]]]:
    """Each ranking fusion's transferability per (target, data seed), then its means; the single-source transfers;
    their test scores, data seed -> target -> source; and random init's, data seed -> target. Splits without a
    pairs.tsv (the report was not asked for) give none. ``weights`` is read_weights'; a split it lacks is read here
    (and a missing weights.tsv refused, as before)."""
    rows, pairs = [], []
    by_seed: dict[int, dict[str, dict[str, float]]] = {}
    random_by_seed: dict[int, dict[str, float]] = {}
    per_fusion: dict[str, list[Transferability]] = defaultdict(list)
    for s in data_seeds:
        side = layout.side(delta, s)
        pairs_path = side.pairs
        if not pairs_path.is_file():
            continue
        random = random_by_seed[s] = test_scores(side.random(first_iters))
        single: dict[str, dict[str, float]] = defaultdict(dict)
        by_seed[s] = single
        for row in read_rows(pairs_path, ["target", "source", "test"]):
            single[row["target"]][row["source"]] = float(row["test"])
            pairs.append(PairScore(delta, s, row["target"], row["source"], row["test"],
                                   float(row["test"]) - random[row["target"]]))
        for fusion in fusions:
            if not fusion.weighting.ranks_sources:
                continue
            by_target = weights.get(fusion.name, {}).get(s) or fusion_weights(side.weights(fusion.name))
            for t in targets:
                sources = sorted(single[t])
                w = {src: by_target[t][src] for src in sources}
                row = Transferability(delta, fusion.name, t, s, spearman([w[x] for x in sources],
                                                                         [single[t][x] for x in sources]),
                                      ndcg_at(w, single[t]), family_precision(w, t, categories))
                per_fusion[fusion.name].append(row)
                rows.append(row)
    for name, per in per_fusion.items():
        means = [float(np.nanmean(v)) if not all(math.isnan(x) for x in v) else float("nan")
                 for v in ([r.spearman for r in per], [r.ndcg for r in per], [r.family_precision for r in per])]
        rows.append(Transferability(delta, name, "mean", None, *means))
    return rows, pairs, {s: dict(single) for s, single in by_seed.items()}, random_by_seed


def compute_results(layout: StudyLayout, deltas: list[str], targets: list[str], fusions: list[Fusion],
                    data_seeds: list[int], budgets: list[int], categories: dict[str, str],
                    label_words: dict[str, set[str]] | None = None) -> StudyResults:
    """Everything the report shows, read back from the study's folders (so it can be rebuilt at any time);
    ``label_words`` (task -> its label words) give the label-word table."""
    names = [f.name for f in fusions]
    tables, rows, pairs, cells, gaps, shares = [], [], [], [], [], []
    for delta in deltas:
        tables += [arm_table(layout, delta, iters, targets, names, data_seeds) for iters in budgets]
        weights = read_weights(layout, delta, names, data_seeds)
        made, made_pairs, single, random = transferability(layout, delta, budgets[0], targets, fusions, data_seeds,
                                                           categories, weights)
        rows += made
        pairs += made_pairs
        cells += estimator_cells(layout, delta, data_seeds, targets, single)
        first = next(t for t in tables if t.delta == delta and t.iters == budgets[0])
        gaps += member_gaps(delta, names, {f: first.scores[f] for f in names}, weights, single)
        ranking = [f.name for f in fusions if f.weighting.ranks_sources]
        shares += label_word_shares(delta, ranking, weights, single, random, label_words or {}, categories)
    return StudyResults(deltas, targets, names, data_seeds, budgets, tables, rows, pairs, cells,
                        summarise_estimators(cells), gaps, shares)
