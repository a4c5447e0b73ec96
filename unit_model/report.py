"""Results of a transfer study (study.py): summary table, gain chart, learning curves, transferability.

``index.html`` shows all of it on one self-contained page. Everything is read back from the study's folders,
so the report can be rebuilt at any time:

* ``{delta}/seed_{s}/iters_{n}/random/result.tsv`` and ``.../iters_{n}/transfer/{method}/result.tsv``: test
  scores of each target on data seed s's split, tuned for n steps from random initialisation and from each
  fused initialisation (same split, budget, seed and selection rule);
* ``{delta}/seed_{s}/fused/{method}/weights.tsv`` and ``heatmap.png``: the fusion weights on that split;
* ``{delta}/seed_{s}/pairs.tsv``: the test score of each target tuned from each single source.

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
from unit_model.fusion_names import fusion_file_name, parse_fusion
from unit_model.html_page import write_index_html
from utils.io import atomic_file, read_tsv, save_figure_atomic, write_text_atomic, write_tsv_atomic


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


def seed_dir(data_seed: int) -> str:
    """The folder of one few-shot split's target side in a study (study.py writes it, this module reads it)."""
    return f"seed_{data_seed}"


def budget_dir(iters: int) -> str:
    """The folder of one target budget (target_iters) within a split's folder."""
    return f"iters_{iters}"


def mean_std(values: list[float]) -> str:
    """``mean ± std`` over seeds (sample std); a single seed has no spread to show."""
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def write_results(root: Path, deltas: list[str], targets: list[str], tasks: list[str], methods: list[str],
                  out: Path, categories: dict[str, str] | None = None, data_seeds: list[int] | None = None,
                  budgets: list[str] | None = None) -> None:
    """The study's tables and figures; ``categories`` (default: task_list's) give family precision.

    Every arm is compared at each budget over the same (target, data seed) cells. ``scores.tsv`` holds each
    cell's test score, from which every figure of ``summary.tsv`` and ``summary.md`` can be recomputed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from task_list import MANUAL_CATEGORIES

    categories = MANUAL_CATEGORIES if categories is None else categories
    data_seeds = [100] if data_seeds is None else data_seeds
    budgets = ["iters_40"] if budgets is None else budgets
    cells = [(t, s) for t in targets for s in data_seeds]
    out.mkdir(parents=True, exist_ok=True)
    (out / "heatmaps").mkdir(exist_ok=True)
    summary_rows, score_rows, md, transfer_rows, pair_rows = [], [], [], [], []
    comparisons: dict[tuple[str, str], dict[str, PairedComparison]] = {}
    seeds_text = ", ".join(map(str, data_seeds))
    for delta in deltas:
        split_roots = {s: root / delta / seed_dir(s) for s in data_seeds}
        for budget in budgets:
            arms = {"random": {s: test_scores(split_roots[s] / budget / "random") for s in data_seeds}}
            arms.update({m: {s: test_scores(split_roots[s] / budget / "transfer" / fusion_file_name(m))
                             for s in data_seeds}
                         for m in methods})
            columns = ["random", *methods]
            cell = {a: [arms[a][s][t] for t, s in cells] for a in columns}  # one score per (target, seed)
            for a in columns:
                score_rows += [[delta, budget, s, t, a, f"{arms[a][s][t]:.4f}"] for t, s in cells]
            means = np.array([np.mean(cell[a]) for a in columns])
            gain = means - means[0]
            rank = rankdata(-np.round(means, 6), method="min").astype(int)  # ties share the better rank
            # each method against random init over the same (target, seed) cells
            paired = {m: paired_comparison(cell[m], cell["random"]) for m in methods}
            comparisons[(delta, budget)] = paired
            per_target = {t: {a: [arms[a][s][t] for s in data_seeds] for a in columns} for t in targets}
            for t in targets:
                summary_rows.append([delta, budget, t, *[f"{np.mean(per_target[t][a]):.4f}" for a in columns]])
            summary_rows.append([delta, budget, "mean", *[f"{x:.4f}" for x in means]])
            summary_rows.append([delta, budget, "gain_over_random", *[f"{x:+.4f}" for x in gain]])
            summary_rows.append([delta, budget, "rank", *[str(r) for r in rank]])
            summary_rows.append([delta, budget, "gain_ci_low", "-", *[signed(paired[m].ci_low) for m in methods]])
            summary_rows.append([delta, budget, "gain_ci_high", "-", *[signed(paired[m].ci_high) for m in methods]])
            summary_rows.append([delta, budget, "wins_ties_losses", "-", *[wtl(paired[m]) for m in methods]])
            summary_rows.append([delta, budget, "wilcoxon_p", "-", *[fmt(paired[m].wilcoxon_p, 4) for m in methods]])
            spread = " (mean ± std over data seeds)" if len(data_seeds) > 1 else ""
            md += [f"### {delta}, {budget.replace('_', ' ')}: test score by initialisation{spread}", "",
                   f"{len(targets)} targets x {len(data_seeds)} data seed(s) ({seeds_text}): {len(cells)} paired "
                   "cells per method; the CI, wins/ties/losses and Wilcoxon p are over those cells.", "",
                   "| target | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
            md += [f"| {t} | " + " | ".join(mean_std(per_target[t][a]) for a in columns) + " |" for t in targets]
            md += ["| **mean** | " + " | ".join(f"**{x:.3f}**" for x in means) + " |",
                   "| gain over random | " + " | ".join(f"{x:+.3f}" for x in gain) + " |",
                   "| rank | " + " | ".join(str(r) for r in rank) + " |",
                   "| 95% CI of the gain | - | " + " | ".join(
                       f"[{signed(paired[m].ci_low, 3)}, {signed(paired[m].ci_high, 3)}]" for m in methods) + " |",
                   "| wins / ties / losses | - | " + " | ".join(wtl(paired[m]) for m in methods) + " |",
                   "| Wilcoxon p | - | " + " | ".join(fmt(paired[m].wilcoxon_p) for m in methods) + " |",
                   "| effective sources | - | " + " | ".join(fmt(float(np.nanmean(
                       [mean_effective_sources(split_roots[s] / "fused" / fusion_file_name(m) / "weights.tsv")
                        for s in data_seeds])))
                       for m in methods) + " |", ""]

            # learning curves (first data seed): random vs the best fused initialisation (by mean test score)
            best = methods[int(np.argmax(means[1:]))] if methods else None
            if best is not None:
                first = split_roots[data_seeds[0]] / budget
                fig, axes = plt.subplots(1, len(targets), figsize=(3 * len(targets), 2.8), squeeze=False)
                auc_random, auc_best = [], []
                for ax, t in zip(axes[0], targets):
                    for label, run_root, aucs in (("random", first / "random", auc_random),
                                                  (best, first / "transfer" / fusion_file_name(best), auc_best)):
                        points = curve(run_root, t)
                        if points:
                            ax.plot(*zip(*points), marker=".", label=label)
                            aucs.append(float(np.mean([d for _, d in points])))
                    ax.set_title(t, fontsize=8)
                    ax.set_xlabel("step", fontsize=7)
                axes[0][0].set_ylabel("dev score")
                axes[0][0].legend(fontsize=7)
                fig.tight_layout()
                save_figure_atomic(fig, out / f"learning_curves_{delta}_{budget}.png", dpi=110)
                plt.close(fig)
                md += [f"Learning curves ({delta}, {budget.replace('_', ' ')}, data seed {data_seeds[0]}): mean dev "
                       f"score over the validations of a run (higher = converges faster): random "
                       f"{np.mean(auc_random):.3f}, {best} {np.mean(auc_best):.3f}.", ""]

        for s in data_seeds:
            for m in methods:
                heatmap = split_roots[s] / "fused" / fusion_file_name(m) / "heatmap.png"
                if heatmap.is_file():
                    with atomic_file(out / "heatmaps" / f"{delta}_{seed_dir(s)}_{fusion_file_name(m)}.png") as tmp:
                        shutil.copyfile(heatmap, tmp)

        # transferability of each weighting method against single-source transfer (tune-all at the first budget)
        per_method: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        for s in data_seeds:
            pairs_path = split_roots[s] / "pairs.tsv"
            if not pairs_path.is_file():
                continue
            random = test_scores(split_roots[s] / budgets[0] / "random")
            single = defaultdict(dict)
            for row in read_rows(pairs_path, ["target", "source", "test"]):
                single[row["target"]][row["source"]] = float(row["test"])
                pair_rows.append([delta, s, row["target"], row["source"], row["test"],
                                  f"{float(row['test']) - random[row['target']]:+.4f}"])
            for m in methods:
                if not parse_fusion(m).ranks_sources:
                    continue
                weights = fusion_weights(split_roots[s] / "fused" / fusion_file_name(m) / "weights.tsv")
                for t in targets:
                    sources = sorted(single[t])
                    w = {src: weights[t][src] for src in sources}
                    rho = spearman([w[src] for src in sources], [single[t][src] for src in sources])
                    nd = ndcg_at(w, single[t])
                    prec = family_precision(w, t, categories)
                    per_method[m].append((rho, nd, prec))
                    transfer_rows.append([delta, m, t, s, fmt(rho), fmt(nd), fmt(prec)])
        for m, per in per_method.items():
            means_m = [float(np.nanmean([v[i] for v in per])) if not all(math.isnan(v[i]) for v in per)
                       else float("nan") for i in range(3)]
            transfer_rows.append([delta, m, "mean", "-", *[fmt(x) for x in means_m]])

    write_tsv(out / "summary.tsv", ["delta", "budget", "target", "random", *methods], summary_rows)
    write_tsv(out / "scores.tsv", ["delta", "budget", "data_seed", "target", "init", "test"], score_rows)
    write_tsv(out / "transferability.tsv", ["delta", "method", "target", "data_seed", "spearman", "ndcg@3",
                                            "family_precision@3"], transfer_rows)
    write_tsv(out / "transfer_pairs.tsv", ["delta", "data_seed", "target", "source", "test", "gain_over_random"],
              pair_rows)
    if transfer_rows:
        md += ["### How well each weighting predicts single-source transfer (mean over targets and data seeds)", "",
               "| delta | method | Spearman | NDCG@3 | family precision@3 |", "|---|---|---|---|---|"]
        md += [f"| {r[0]} | {r[1]} | {r[4]} | {r[5]} | {r[6]} |" for r in transfer_rows if r[2] == "mean"]
        md.append("")
    write_text_atomic(out / "summary.md", "\n".join(md) + "\n")

    # gain over random init per method: one panel per budget, one bar per delta method, 95% CI bars
    fig, axes = plt.subplots(1, len(budgets), figsize=((2 + 0.6 * len(methods) * len(deltas)) * len(budgets), 4),
                             squeeze=False, sharey=True)
    width = 0.8 / max(1, len(deltas))
    for ax, budget in zip(axes[0], budgets):
        for i, delta in enumerate(deltas):
            xs = np.arange(len(methods)) + i * width
            paired = comparisons[(delta, budget)]
            means_d = [paired[m].mean_gain for m in methods]
            err = np.array([[g - c.ci_low, c.ci_high - g] if c.ci_low is not None else [0.0, 0.0]
                            for g, c in zip(means_d, (paired[m] for m in methods))]).T
            ax.bar(xs, means_d, width, yerr=err if len(methods) else None, capsize=3, label=delta)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(np.arange(len(methods)) + width * (len(deltas) - 1) / 2)
        ax.set_xticklabels(methods, rotation=45, ha="right")
        ax.set_title(budget.replace("_", " "), fontsize=9)
    axes[0][0].set_ylabel("test gain over random init\n(mean, 95% CI)")
    axes[0][0].legend()
    fig.tight_layout()
    save_figure_atomic(fig, out / "gain_by_method.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_index_html(out, md)
