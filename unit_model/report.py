"""Results of a transfer study (study.py): summary table, gain chart, learning curves, transferability.

Everything is read back from the study's folders, so the report can be rebuilt at any time:

* ``{delta}/random/result.tsv`` and ``{delta}/transfer/{method}/result.tsv``: test scores of each target
  tuned from random initialisation and from each fused initialisation (same budget and seed);
* ``{delta}/fused/{method}/weights.tsv`` and ``heatmap.png``: the fusion weights;
* ``{delta}/pairs.tsv``: the test score of each target tuned from each single source.

Transferability of a method = how well its weights rank the single sources by the transfer they really
give: Spearman correlation between weight and single-source test score per target, and NDCG@3 with the
test score as relevance (ranking sources by gain or by score is the same within a target, and NDCG needs
non-negative relevance). Family precision@3 is the share of a target's three heaviest sources that come
from its own family (manual category).
"""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from models.run_folders import read_result_tsv
from unit_model.comparison import PairedComparison, paired_comparison
from utils.io import atomic_file, read_tsv, save_figure_atomic, write_text_atomic, write_tsv_atomic

UNIFORM = ("average", "manual")  # methods whose weights carry no ranking


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


def ndcg_at(scores: dict[str, float], relevance: dict[str, float], k: int = 3) -> float:
    """NDCG@k of the ranking by ``scores`` (ties broken by name) against ``relevance``."""
    def dcg(order: list[str]) -> float:
        return sum(relevance[s] / math.log2(i + 2) for i, s in enumerate(order[:k]))

    ranked = sorted(scores, key=lambda s: (-scores[s], s))
    ideal = sorted(relevance, key=lambda s: (-relevance[s], s))
    best = dcg(ideal)
    return dcg(ranked) / best if best > 0 else float("nan")


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


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def signed(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:+.{digits}f}"


def wtl(c: PairedComparison) -> str:
    return f"{c.wins}/{c.ties}/{c.losses}"


def write_tsv(path: Path, header: list[str], rows: list[list]) -> None:

    write_tsv_atomic(path, header, rows)


def write_results(root: Path, deltas: list[str], targets: list[str], tasks: list[str], methods: list[str],
                  out: Path, categories: dict[str, str] | None = None) -> None:
    """The study's tables and figures; ``categories`` (default: task_list's) give family precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from task_list import MANUAL_CATEGORIES

    categories = MANUAL_CATEGORIES if categories is None else categories
    out.mkdir(parents=True, exist_ok=True)
    (out / "heatmaps").mkdir(exist_ok=True)
    summary_rows, md, gains, transfer_rows, pair_rows = [], [], {}, [], []
    comparisons: dict[str, dict[str, PairedComparison]] = {}
    for delta in deltas:
        base = root / delta
        random = test_scores(base / "random")
        fused = {m: test_scores(base / "transfer" / m) for m in methods}
        columns = ["random", *methods]
        table = {t: [random[t], *[fused[m][t] for m in methods]] for t in targets}
        means = np.mean([table[t] for t in targets], axis=0)
        gain = means - means[0]
        rank = rankdata(-np.round(means, 6), method="min").astype(int)  # ties share the better rank
        gains[delta] = dict(zip(methods, gain[1:]))
        # each method against random init on the same targets: bootstrap CI, wins/ties/losses, Wilcoxon
        paired = {m: paired_comparison([fused[m][t] for t in targets], [random[t] for t in targets])
                  for m in methods}
        comparisons[delta] = paired
        for t in targets:
            summary_rows.append([delta, t, *[f"{x:.4f}" for x in table[t]]])
        summary_rows.append([delta, "mean", *[f"{x:.4f}" for x in means]])
        summary_rows.append([delta, "gain_over_random", *[f"{x:+.4f}" for x in gain]])
        summary_rows.append([delta, "rank", *[str(r) for r in rank]])
        summary_rows.append([delta, "gain_ci_low", "-", *[signed(paired[m].ci_low) for m in methods]])
        summary_rows.append([delta, "gain_ci_high", "-", *[signed(paired[m].ci_high) for m in methods]])
        summary_rows.append([delta, "wins_ties_losses", "-", *[wtl(paired[m]) for m in methods]])
        summary_rows.append([delta, "wilcoxon_p", "-", *[fmt(paired[m].wilcoxon_p, 4) for m in methods]])
        md += [f"### {delta}: test score by initialisation", "",
               "| target | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        md += [f"| {t} | " + " | ".join(f"{x:.3f}" for x in table[t]) + " |" for t in targets]
        md += ["| **mean** | " + " | ".join(f"**{x:.3f}**" for x in means) + " |",
               "| gain over random | " + " | ".join(f"{x:+.3f}" for x in gain) + " |",
               "| rank | " + " | ".join(str(r) for r in rank) + " |",
               "| 95% CI of the gain | - | " + " | ".join(
                   f"[{signed(paired[m].ci_low, 3)}, {signed(paired[m].ci_high, 3)}]" for m in methods) + " |",
               "| wins / ties / losses | - | " + " | ".join(wtl(paired[m]) for m in methods) + " |",
               "| Wilcoxon p | - | " + " | ".join(fmt(paired[m].wilcoxon_p) for m in methods) + " |",
               "| effective sources | - | " + " | ".join(
                   fmt(mean_effective_sources(base / "fused" / m / "weights.tsv")) for m in methods) + " |", ""]

        for m in methods:
            heatmap = base / "fused" / m / "heatmap.png"
            if heatmap.is_file():
                with atomic_file(out / "heatmaps" / f"{delta}_{m}.png") as tmp:
                    shutil.copyfile(heatmap, tmp)

        # learning curves: random vs the best fused initialisation (by mean test score)
        best = methods[int(np.argmax(means[1:]))] if methods else None
        if best is not None:
            fig, axes = plt.subplots(1, len(targets), figsize=(3 * len(targets), 2.8), squeeze=False)
            auc_random, auc_best = [], []
            for ax, t in zip(axes[0], targets):
                for label, run_root, aucs in (("random", base / "random", auc_random),
                                              (best, base / "transfer" / best, auc_best)):
                    points = curve(run_root, t)
                    if points:
                        ax.plot(*zip(*points), marker=".", label=label)
                        aucs.append(float(np.mean([d for _, d in points])))
                ax.set_title(t, fontsize=8)
                ax.set_xlabel("step", fontsize=7)
            axes[0][0].set_ylabel("dev score")
            axes[0][0].legend(fontsize=7)
            fig.tight_layout()
            save_figure_atomic(fig, out / f"learning_curves_{delta}.png", dpi=110)
            plt.close(fig)
            md += [f"Learning curves ({delta}): mean dev score over the validations of a run (higher = converges "
                   f"faster): random {np.mean(auc_random):.3f}, {best} {np.mean(auc_best):.3f}.", ""]

        # transferability of each weighting method against single-source transfer
        pairs_path = base / "pairs.tsv"
        if pairs_path.is_file():
            single = defaultdict(dict)
            for row in read_rows(pairs_path, ["target", "source", "test"]):
                single[row["target"]][row["source"]] = float(row["test"])
                pair_rows.append([delta, row["target"], row["source"], row["test"],
                                  f"{float(row['test']) - random[row['target']]:+.4f}"])
            for m in methods:
                if m in UNIFORM:
                    continue
                weights = fusion_weights(base / "fused" / m / "weights.tsv")
                per = []
                for t in targets:
                    sources = sorted(single[t])
                    w = {s: weights[t][s] for s in sources}
                    rho = spearman([w[s] for s in sources], [single[t][s] for s in sources])
                    nd = ndcg_at(w, single[t])
                    prec = family_precision(w, t, categories)
                    per.append((rho, nd, prec))
                    transfer_rows.append([delta, m, t, fmt(rho), fmt(nd), fmt(prec)])
                means_m = [float(np.nanmean([v[i] for v in per])) if not all(math.isnan(v[i]) for v in per)
                           else float("nan") for i in range(3)]
                transfer_rows.append([delta, m, "mean", *[fmt(x) for x in means_m]])

    header = ["delta", "target", "random", *methods]
    write_tsv(out / "summary.tsv", header, summary_rows)
    write_tsv(out / "transferability.tsv", ["delta", "method", "target", "spearman", "ndcg@3",
                                            "family_precision@3"], transfer_rows)
    write_tsv(out / "transfer_pairs.tsv", ["delta", "target", "source", "test", "gain_over_random"], pair_rows)
    if transfer_rows:
        md += ["### How well each weighting predicts single-source transfer (mean over targets)", "",
               "| delta | method | Spearman | NDCG@3 | family precision@3 |", "|---|---|---|---|---|"]
        md += [f"| {r[0]} | {r[1]} | {r[3]} | {r[4]} | {r[5]} |" for r in transfer_rows if r[2] == "mean"]
        md.append("")
    write_text_atomic(out / "summary.md", "\n".join(md) + "\n")

    fig, ax = plt.subplots(figsize=(2 + 0.6 * len(methods) * len(deltas), 4))
    width = 0.8 / max(1, len(deltas))
    for i, delta in enumerate(deltas):
        xs = np.arange(len(methods)) + i * width
        means_d = [gains[delta][m] for m in methods]
        # error bars: the 95% bootstrap CI of each gain (none where it is unknown)
        err = np.array([[g - c.ci_low, c.ci_high - g] if c.ci_low is not None else [0.0, 0.0]
                        for g, c in zip(means_d, (comparisons[delta][m] for m in methods))]).T
        ax.bar(xs, means_d, width, yerr=err if len(methods) else None, capsize=3, label=delta)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(methods)) + width * (len(deltas) - 1) / 2)
    ax.set_xticklabels(methods, rotation=45, ha="right")
    ax.set_ylabel("test gain over random init\n(mean, 95% CI)")
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, out / "gain_by_method.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
