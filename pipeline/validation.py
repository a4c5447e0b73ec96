"""The validation of the transferability estimators: every similarity metric's scores against the transfer that
really happens (the study's single-source transfers, ``pairs.tsv``), and every fusion against its own members.

Per estimator and (target, data seed) cell, over the target's sources that have both a score and a transfer:

* Spearman ρ and Kendall τ (scipy) between the score, oriented so that higher means "more similar", and the
  single-source test score;
* NDCG@3 of the estimator's ranking, with the test score as relevance;
* top-1 regret: the best single source's test score minus that of the source the estimator ranks first (0: it
  picked the best one; ranking by gain or by score is the same within a cell).

Each figure is then a mean over cells with its 95% bootstrap CI (pipeline.comparison), and each estimator's
Spearman and regret are compared with Loss's on the same cells (a paired CI of the difference). A cell where a
statistic is undefined (tied scores, a metric written "-" on a target without classes) is left out of that
statistic and counted.

Per fusion and cell: its transferred test score minus the best single source among its members (the sources it
gives weight > 0), and minus the oracle best single source.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from pipeline.comparison import PairedComparison, paired_comparison
from pipeline.layout import StudyLayout
from utils.errors import UserInputError
from utils.io import read_tsv

REFERENCE_ESTIMATOR = "Loss"  # the one every other estimator is compared with, cell by cell
STATISTICS = ("spearman", "kendall", "ndcg", "regret")


@dataclass(frozen=True)
class EstimatorCell:
    delta: str
    metric: str
    target: str
    data_seed: int
    sources: int
    spearman: float
    kendall: float
    ndcg: float
    regret: float


@dataclass(frozen=True)
class EstimatorSummary:
    """One estimator over every cell: each statistic's mean and CI, and the paired difference from Loss's."""

    delta: str
    metric: str
    cells: int
    stats: dict[str, PairedComparison | None]  # statistic -> its mean and CI over the cells where it is defined
    versus_reference: dict[str, PairedComparison | None]  # spearman, regret -> (this - Loss) over shared cells


@dataclass(frozen=True)
class MemberGap:
    delta: str
    fusion: str
    cells: int
    over_best_member: PairedComparison  # fused - best single source among its members
    to_oracle: PairedComparison  # fused - best single source of all


def ndcg_at(scores: dict[str, float], relevance: dict[str, float], k: int = 3) -> float:
    """NDCG@k of the ranking by ``scores`` (ties broken by name) against ``relevance``."""
    def dcg(order: list[str]) -> float:
        return sum(relevance[s] / math.log2(i + 2) for i, s in enumerate(order[:k]))

    ranked = sorted(scores, key=lambda s: (-scores[s], s))
    ideal = sorted(relevance, key=lambda s: (-relevance[s], s))
    best = dcg(ideal)
    return dcg(ranked) / best if best > 0 else float("nan")


def rank_statistics(similarity: dict[str, float], transfer: dict[str, float]) -> tuple[float, float, float, float]:
    """(Spearman, Kendall τ, NDCG@3, top-1 regret) of ``similarity`` (higher = more similar) against ``transfer``
    over the sources both have; NaN where undefined."""
    from scipy.stats import kendalltau, spearmanr

    sources = sorted(set(similarity) & set(transfer))
    x, y = [similarity[s] for s in sources], [transfer[s] for s in sources]
    if len(sources) < 2:
        return (float("nan"),) * 4
    ranked = len(set(x)) > 1 and len(set(y)) > 1
    rho = float(spearmanr(x, y).statistic) if ranked else float("nan")
    tau = float(kendalltau(x, y).statistic) if ranked else float("nan")
    first = min(sources, key=lambda s: (-similarity[s], s))
    regret = max(y) - transfer[first]
    return rho, tau, ndcg_at({s: similarity[s] for s in sources}, {s: transfer[s] for s in sources}), regret


def read_similarity(path) -> dict[str, dict[str, dict[str, float]]]:
    """metric -> target -> source -> oriented similarity (the mean over groups); a pair with an unknown ("-")
    score is left out."""
    from get_similarity.metrics import METRICS

    per: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    unknown = set()
    for _, row in read_tsv(path, ["target", "source", "metric", "group", "score"]):
        key = (row["metric"], row["target"], row["source"])
        if row["score"] == "-" or row["metric"] not in METRICS:
            unknown.add(key)
            continue
        per[key].append(METRICS[row["metric"]].similarity(float(row["score"])))
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for (metric, target, source), values in per.items():
        if (metric, target, source) not in unknown:
            out[metric][target][source] = float(np.mean(values))
    return out


def mean_ci(values: list[float]) -> PairedComparison | None:
    """Mean and 95% bootstrap CI of finite ``values`` (None when there are none)."""
    finite = [v for v in values if math.isfinite(v)]
    return paired_comparison(finite, [0.0] * len(finite)) if finite else None


def estimator_cells(layout: StudyLayout, delta: str, data_seeds: list[int], targets: list[str],
                    single: dict[int, dict[str, dict[str, float]]]) -> list[EstimatorCell]:
    """Every metric of each split's similarity table against that split's single-source transfers."""
    cells = []
    for s in data_seeds:
        table = layout.side(delta, s).similarity
        if s not in single or not table.is_file():
            continue
        for metric, by_target in read_similarity(table).items():
            for t in targets:
                if t in by_target and t in single[s]:
                    shared = len(set(by_target[t]) & set(single[s][t]))
                    cells.append(EstimatorCell(delta, metric, t, s, shared,
                                               *rank_statistics(by_target[t], single[s][t])))
    return cells


def summarise_estimators(cells: list[EstimatorCell]) -> list[EstimatorSummary]:
    """Each estimator's means and CIs, and its paired difference from Loss on the cells both have."""
    by_metric: dict[tuple[str, str], dict[tuple[str, int], EstimatorCell]] = defaultdict(dict)
    for c in cells:
        by_metric[(c.delta, c.metric)][(c.target, c.data_seed)] = c
    out = []
    for (delta, metric), mine in by_metric.items():
        stats = {name: mean_ci([getattr(c, name) for c in mine.values()]) for name in STATISTICS}
        reference = by_metric.get((delta, REFERENCE_ESTIMATOR), {})
        versus: dict[str, PairedComparison | None] = {}
        for name in ("spearman", "regret"):
            pairs = [(getattr(mine[k], name), getattr(reference[k], name)) for k in mine if k in reference]
            pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
            versus[name] = (paired_comparison([a for a, _ in pairs], [b for _, b in pairs])
                            if pairs and metric != REFERENCE_ESTIMATOR else None)
        out.append(EstimatorSummary(delta, metric, len(mine), stats, versus))
    return out


def member_gaps(delta: str, fusions: list[str], fused: dict[str, dict[tuple[str, int], float]],
                weights: dict[str, dict[int, dict[str, dict[str, float]]]],
                single: dict[int, dict[str, dict[str, float]]]) -> list[MemberGap]:
    """Each fusion's transferred score against the best of its members and the oracle best single source, over
    the cells that have single-source transfers. ``fused[f][(target, seed)]`` is its test score, ``weights[f][seed]
    [target][source]`` its weights."""
    out = []
    for f in fusions:
        over, oracle = [], []
        for (t, s), score in fused[f].items():
            transfers = single.get(s, {}).get(t)
            members = [src for src, w in weights.get(f, {}).get(s, {}).get(t, {}).items() if w > 0]
            if not transfers or not members:
                continue
            known = [transfers[m] for m in members if m in transfers]
            if not known:
                continue
            over.append((score, max(known)))
            oracle.append((score, max(transfers.values())))
        if over:
            out.append(MemberGap(delta, f, len(over), paired_comparison(*map(list, zip(*over))),
                                 paired_comparison(*map(list, zip(*oracle)))))
    return out


@dataclass(frozen=True)
class LabelWordShare:
    """On targets whose label words belong to another family: how much weight a fusion puts on the sources that
    share the target's label words (of another family) and on those of the target's own family (its skill),
    mean over those cells with CIs. ``fusion`` "uniform" is the share each group has by count, and "tuned alone"
    the mean single-source gain over random init of each group."""

    delta: str
    fusion: str
    cells: int
    label_word: PairedComparison
    skill: PairedComparison


def task_label_words(task_dir, tasks: list[str]) -> dict[str, set[str]]:
    """The label words of each classification task (models.examples.label_set of its largest train split); a task
    with free-text answers or without data has none."""
    from dataloader.crossfit import available_shots, load_task
    from dataloader.metrics import metric_for_task
    from models.examples import label_set

    words = {}
    for task in tasks:
        try:
            k, seed = max(available_shots(task_dir, task))
        except (ValueError, OSError, UserInputError):  # no folder or no split: no known label words
            continue
        labels = label_set(load_task(task_dir, task, k, seed, ["train"])["train"], metric_for_task(task, task_dir))
        if labels:
            words[task] = set(labels)
    return words


def label_word_groups(target: str, sources: list[str], words: dict[str, set[str]],
                      categories: dict[str, str]) -> tuple[list[str], list[str]] | None:
    """(sources that share a label word with ``target`` from another category, sources of its category), or None
    when the target is no trap (either group empty, or its words or category unknown)."""
    if target not in words or target not in categories:
        return None
    mine = categories[target]
    word = [s for s in sources if categories.get(s) not in (None, mine) and words.get(s, set()) & words[target]]
    skill = [s for s in sources if categories.get(s) == mine]
    return (word, skill) if word and skill else None


def label_word_shares(delta: str, fusions: list[str], weights: dict[str, dict[int, dict[str, dict[str, float]]]],
                      single: dict[int, dict[str, dict[str, float]]], random: dict[int, dict[str, float]],
                      words: dict[str, set[str]], categories: dict[str, str]) -> list[LabelWordShare]:
    """Each fusion's weight on label-word sources against skill sources, over the trap cells; then the share by
    count ("uniform") and the groups' single-source gains ("tuned alone")."""
    shares: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for s, by_target in single.items():
        for t, transfers in by_target.items():
            groups = label_word_groups(t, sorted(transfers), words, categories)
            if groups is None:
                continue
            word, skill = groups
            shares["uniform"].append((len(word) / len(transfers), len(skill) / len(transfers)))
            base = random[s][t]
            shares["tuned alone"].append((float(np.mean([transfers[x] - base for x in word])),
                                          float(np.mean([transfers[x] - base for x in skill]))))
            for f in fusions:
                w = weights.get(f, {}).get(s, {}).get(t)
                if w:
                    total = sum(w.values())
                    shares[f].append((sum(w.get(x, 0.0) for x in word) / total,
                                      sum(w.get(x, 0.0) for x in skill) / total))
    return [LabelWordShare(delta, f, len(v), mean_ci([a for a, _ in v]), mean_ci([b for _, b in v]))
            for f, v in shares.items() if v]
