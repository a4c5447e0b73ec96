"""The study's report rendered from its computed results (pipeline/results.py): ``results/`` holds summary.tsv,
scores.tsv (every cell, from which every figure can be recomputed), transferability.tsv, transfer_pairs.tsv,
summary.md, the heatmaps, the gain chart, the learning curves and index.html (one self-contained page).

The summary is built once as blocks (headings, paragraphs, tables); summary.md and the page are two renderings of
the same blocks.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass

import numpy as np

from pipeline.comparison import PairedComparison
from pipeline.html_page import write_index_html
from pipeline.layout import StudyLayout, budget_dir
from pipeline.results import ArmTable, StudyResults, compute_results
from pipeline.settings import StudyPlan
from pipeline.validation import REFERENCE_ESTIMATOR, STATISTICS
from utils.io import atomic_file, save_figure_atomic, write_text_atomic, write_tsv_atomic


@dataclass(frozen=True)
class Block:
    """One piece of the summary: a heading, a paragraph, or a table (``rows`` under ``header``)."""

    kind: str  # heading | paragraph | table
    text: str = ""
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def signed(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:+.{digits}f}"


def wtl(c: PairedComparison) -> str:
    return f"{c.wins}/{c.ties}/{c.losses}"


def mean_std(values: list[float]) -> str:
    """``mean ± std`` over seeds (sample std); a single seed has no spread to show."""
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def curve_means(table: ArmTable) -> dict[str, float]:
    """Each plotted arm's mean dev score over the validations of its runs (higher = converges faster)."""
    return {arm: float(np.mean([float(np.mean([d for _, d in points])) for points in by_target.values() if points]))
            for arm, by_target in table.curves.items()}


def table_blocks(results: StudyResults, table: ArmTable) -> list[Block]:
    """The summary of one delta method at one budget."""
    seeds, targets, fusions = results.data_seeds, results.targets, results.fusions
    means, gains, paired = table.means(), table.gains(), table.paired
    label = budget_dir(table.iters).replace("_", " ")
    spread = " (mean ± std over data seeds)" if len(seeds) > 1 else ""
    rows = [(t, *[mean_std(table.per_target(t, a, seeds)) for a in table.arms]) for t in targets]
    rows += [("**mean**", *[f"**{x:.3f}**" for x in means]),
             ("gain over random", *[f"{x:+.3f}" for x in gains]),
             ("rank", *[str(r) for r in table.ranks()]),
             ("95% CI of the gain", "-", *[f"[{signed(paired[m].ci_low, 3)}, {signed(paired[m].ci_high, 3)}]"
                                           for m in fusions]),
             ("wins / ties / losses", "-", *[wtl(paired[m]) for m in fusions]),
             ("Wilcoxon p", "-", *[fmt(paired[m].wilcoxon_p) for m in fusions]),
             ("effective sources", "-", *[fmt(table.effective_sources[m]) for m in fusions])]
    blocks = [Block("heading", f"{table.delta}, {label}: test score by initialisation{spread}"),
              Block("paragraph", f"{len(targets)} targets x {len(seeds)} data seed(s) ({', '.join(map(str, seeds))}): "
                                 f"{len(targets) * len(seeds)} paired cells per method; the CI, wins/ties/losses and "
                                 "Wilcoxon p are over those cells."),
              Block("table", header=("target", *table.arms), rows=tuple(rows))]
    if table.curves:
        best = [arm for arm in table.curves if arm != "random"][0]
        auc = curve_means(table)
        blocks.append(Block("paragraph", f"Learning curves ({table.delta}, {label}, data seed {seeds[0]}): mean dev "
                                         f"score over the validations of a run (higher = converges faster): random "
                                         f"{auc['random']:.3f}, {best} {auc[best]:.3f}."))
    return blocks


def with_ci(c: PairedComparison | None, digits: int = 2) -> str:
    """``mean [low, high]``, or "-" when unknown."""
    if c is None:
        return "-"
    if c.ci_low is None:
        return f"{c.mean_gain:+.{digits}f}"
    return f"{c.mean_gain:+.{digits}f} [{c.ci_low:+.{digits}f}, {c.ci_high:+.{digits}f}]"


def estimator_blocks(results: StudyResults) -> list[Block]:
    """Every similarity metric against single-source transfer, and every fusion against its members."""
    blocks: list[Block] = []
    if results.estimators:
        rows = tuple((e.delta, e.metric, str(e.cells), *[with_ci(e.stats[name]) for name in STATISTICS],
                      with_ci(e.versus_reference["spearman"]), with_ci(e.versus_reference["regret"]))
                     for e in results.estimators)
        blocks += [Block("heading", "Transferability estimators against single-source transfer"),
                   Block("paragraph", "Per (target, data seed) cell, each metric's scores (oriented: higher = more "
                                      "similar) against the test scores of the target tuned from each single source; "
                                      "mean over cells [95% bootstrap CI]. Regret: the best source's test score minus "
                                      f"that of the source ranked first. The last two columns: this metric minus "
                                      f"{REFERENCE_ESTIMATOR} on the same cells."),
                   Block("table", header=("delta", "estimator", "cells", "Spearman", "Kendall τ", "NDCG@3",
                                          "top-1 regret", f"Spearman - {REFERENCE_ESTIMATOR}",
                                          f"regret - {REFERENCE_ESTIMATOR}"), rows=rows),
                   Block("paragraph", ranking_sentence(results))]
    if results.member_gaps:
        blocks += [Block("heading", "Each fusion against its own members (first budget)"),
                   Block("paragraph", "Fused start's test score minus the best single-source transfer among the "
                                      "sources it weights (> 0), and minus the best single source of all (the "
                                      "oracle); mean over cells [95% bootstrap CI]."),
                   Block("table", header=("delta", "fusion", "cells", "over its best member", "to the oracle"),
                         rows=tuple((g.delta, g.fusion, str(g.cells), with_ci(g.over_best_member, 3),
                                     with_ci(g.to_oracle, 3)) for g in results.member_gaps))]
    if results.label_words:
        blocks += [Block("heading", "Label words or skill? (targets whose label words belong to another family)"),
                   Block("paragraph", "Share of each fusion's weight on the sources that answer with the target's "
                                      "label words but belong to another family, and on the sources of the target's "
                                      "own family; \"uniform\": each group's share by count; \"tuned alone\": each "
                                      "group's mean single-source test gain over random init (first budget). Mean "
                                      "over the trap cells [95% bootstrap CI]."),
                   Block("table", header=("delta", "fusion", "cells", "label-word sources", "skill sources"),
                         rows=tuple((w.delta, w.fusion, str(w.cells), with_ci(w.label_word), with_ci(w.skill))
                                    for w in results.label_words))]
    return blocks


def ranking_sentence(results: StudyResults) -> str:
    """What the estimator table supports: the best mean Spearman, and whether its CI against Loss excludes 0."""
    sentences = []
    for delta in results.deltas:
        mine = [e for e in results.estimators if e.delta == delta and e.stats["spearman"] is not None]
        if not mine:
            continue
        best = max(mine, key=lambda e: e.stats["spearman"].mean_gain)
        versus = best.versus_reference["spearman"]
        if best.metric == REFERENCE_ESTIMATOR:
            verdict = f"no other estimator has a higher mean than {REFERENCE_ESTIMATOR}"
        elif versus is not None and versus.ci_excludes_zero:
            verdict = f"its difference from {REFERENCE_ESTIMATOR}'s excludes 0: this ranking stands"
        else:
            verdict = f"its CI against {REFERENCE_ESTIMATOR}'s includes 0: the two are not told apart"
        sentences.append(f"{delta}: the highest mean Spearman is {best.metric}'s "
                         f"({best.stats['spearman'].mean_gain:+.2f}); {verdict}.")
    return " ".join(sentences)


def summary_blocks(results: StudyResults) -> list[Block]:
    blocks = [b for table in results.tables for b in table_blocks(results, table)]
    means = [r for r in results.transferability if r.data_seed is None]
    if results.transferability:
        blocks += [Block("heading", "How well each weighting predicts single-source transfer (mean over targets and "
                                    "data seeds)"),
                   Block("table", header=("delta", "method", "Spearman", "NDCG@3", "family precision@3"),
                         rows=tuple((r.delta, r.fusion, fmt(r.spearman), fmt(r.ndcg), fmt(r.family_precision))
                                    for r in means))]
    return blocks + estimator_blocks(results)


def markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if b.kind == "heading":
            lines += [f"### {b.text}", ""]
        elif b.kind == "paragraph":
            lines += [b.text, ""]
        else:
            lines += ["| " + " | ".join(b.header) + " |", "|---|" + "---|" * (len(b.header) - 1)]
            lines += ["| " + " | ".join(row) + " |" for row in b.rows]
            lines.append("")
    return "\n".join(lines) + "\n"


def write_tables(results: StudyResults, layout: StudyLayout) -> None:
    """summary.tsv, scores.tsv, transferability.tsv and transfer_pairs.tsv."""
    summary, scores = [], []
    for table in results.tables:
        budget, fusions, paired = budget_dir(table.iters), results.fusions, table.paired
        for a in table.arms:
            scores += [[table.delta, budget, s, t, a, f"{table.scores[a][(t, s)]:.4f}"]
                       for t in results.targets for s in results.data_seeds]
        summary += [[table.delta, budget, t, *[f"{np.mean(table.per_target(t, a, results.data_seeds)):.4f}"
                                               for a in table.arms]] for t in results.targets]
        summary += [[table.delta, budget, "mean", *[f"{x:.4f}" for x in table.means()]],
                    [table.delta, budget, "gain_over_random", *[f"{x:+.4f}" for x in table.gains()]],
                    [table.delta, budget, "rank", *[str(r) for r in table.ranks()]],
                    [table.delta, budget, "gain_ci_low", "-", *[signed(paired[m].ci_low) for m in fusions]],
                    [table.delta, budget, "gain_ci_high", "-", *[signed(paired[m].ci_high) for m in fusions]],
                    [table.delta, budget, "wins_ties_losses", "-", *[wtl(paired[m]) for m in fusions]],
                    [table.delta, budget, "wilcoxon_p", "-", *[fmt(paired[m].wilcoxon_p, 4) for m in fusions]]]
    out = layout.result_file
    write_tsv_atomic(out("summary.tsv"), ["delta", "budget", "target", "random", *results.fusions], summary)
    write_tsv_atomic(out("scores.tsv"), ["delta", "budget", "data_seed", "target", "init", "test"], scores)
    write_tsv_atomic(out("transferability.tsv"), ["delta", "method", "target", "data_seed", "spearman", "ndcg@3",
                                                  "family_precision@3"],
                     [[r.delta, r.fusion, r.target, "-" if r.data_seed is None else r.data_seed, fmt(r.spearman),
                       fmt(r.ndcg), fmt(r.family_precision)] for r in results.transferability])
    write_tsv_atomic(out("estimators.tsv"), ["delta", "metric", "target", "data_seed", "sources", "spearman",
                                             "kendall", "ndcg@3", "top1_regret"],
                     [[c.delta, c.metric, c.target, c.data_seed, c.sources, fmt(c.spearman), fmt(c.kendall),
                       fmt(c.ndcg), fmt(c.regret, 4)] for c in results.estimator_cells])
    write_tsv_atomic(out("transfer_pairs.tsv"), ["delta", "data_seed", "target", "source", "test", "gain_over_random"],
                     [[r.delta, r.data_seed, r.target, r.source, r.test, f"{r.gain:+.4f}"] for r in results.pairs])


def plot_learning_curves(results: StudyResults, layout: StudyLayout) -> None:
    import matplotlib.pyplot as plt

    for table in results.tables:
        if not table.curves:
            continue
        targets = results.targets
        fig, axes = plt.subplots(1, len(targets), figsize=(3 * len(targets), 2.8), squeeze=False)
        for ax, t in zip(axes[0], targets):
            for arm, by_target in table.curves.items():
                if by_target[t]:
                    ax.plot(*zip(*by_target[t]), marker=".", label=arm)
            ax.set_title(t, fontsize=8)
            ax.set_xlabel("step", fontsize=7)
        axes[0][0].set_ylabel("dev score")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        save_figure_atomic(fig, layout.learning_curves(table.delta, table.iters), dpi=110)
        plt.close(fig)


def plot_gains(results: StudyResults, layout: StudyLayout) -> None:
    """Gain over random init per fusion: one panel per budget, one bar per delta method, 95% CI bars."""
    import matplotlib.pyplot as plt

    fusions, deltas, budgets = results.fusions, results.deltas, results.budgets
    by_key = {(t.delta, t.iters): t.paired for t in results.tables}
    fig, axes = plt.subplots(1, len(budgets), figsize=((2 + 0.6 * len(fusions) * len(deltas)) * len(budgets), 4),
                             squeeze=False, sharey=True)
    width = 0.8 / max(1, len(deltas))
    for ax, iters in zip(axes[0], budgets):
        for i, delta in enumerate(deltas):
            paired = by_key[(delta, iters)]
            gains = [paired[m].mean_gain for m in fusions]
            err = np.array([[g - c.ci_low, c.ci_high - g] if c.ci_low is not None else [0.0, 0.0]
                            for g, c in zip(gains, (paired[m] for m in fusions))]).T
            ax.bar(np.arange(len(fusions)) + i * width, gains, width, yerr=err if len(fusions) else None, capsize=3,
                   label=delta)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(np.arange(len(fusions)) + width * (len(deltas) - 1) / 2)
        ax.set_xticklabels(fusions, rotation=45, ha="right")
        ax.set_title(budget_dir(iters).replace("_", " "), fontsize=9)
    axes[0][0].set_ylabel("test gain over random init\n(mean, 95% CI)")
    axes[0][0].legend()
    fig.tight_layout()
    save_figure_atomic(fig, layout.result_file("gain_by_method.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_estimators(results: StudyResults, layout: StudyLayout) -> None:
    """Each estimator's mean Spearman with single-source transfer, with its 95% CI; one panel per delta method."""
    import matplotlib.pyplot as plt

    deltas = [d for d in results.deltas if any(e.delta == d for e in results.estimators)]
    if not deltas:
        return
    fig, axes = plt.subplots(1, len(deltas), figsize=(4.5 * len(deltas), 3.2), squeeze=False, sharey=True)
    for ax, delta in zip(axes[0], deltas):
        mine = [e for e in results.estimators if e.delta == delta and e.stats["spearman"] is not None]
        means = [e.stats["spearman"].mean_gain for e in mine]
        err = np.array([[m - c.ci_low, c.ci_high - m] if c.ci_low is not None else [0.0, 0.0]
                        for m, c in zip(means, (e.stats["spearman"] for e in mine))]).T
        ax.errorbar(np.arange(len(mine)), means, yerr=err if mine else None, fmt="o", capsize=3)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(np.arange(len(mine)))
        ax.set_xticklabels([e.metric for e in mine], rotation=45, ha="right")
        ax.set_title(delta, fontsize=9)
    axes[0][0].set_ylabel("Spearman with single-source\ntransfer (mean, 95% CI)")
    fig.tight_layout()
    save_figure_atomic(fig, layout.result_file("estimators.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)


def copy_heatmaps(results: StudyResults, layout: StudyLayout) -> None:
    for delta in results.deltas:
        for s in results.data_seeds:
            for m in results.fusions:
                heatmap = layout.side(delta, s).heatmap(m)
                if heatmap.is_file():
                    with atomic_file(layout.result_heatmap(delta, s, m)) as tmp:
                        shutil.copyfile(heatmap, tmp)


def render(results: StudyResults, layout: StudyLayout) -> None:
    """Every file of ``results/`` from the computed results."""
    import matplotlib

    matplotlib.use("Agg")
    layout.results.mkdir(parents=True, exist_ok=True)
    (layout.results / "heatmaps").mkdir(exist_ok=True)
    blocks = summary_blocks(results)
    write_tables(results, layout)
    write_text_atomic(layout.result_file("summary.md"), markdown(blocks))
    plot_learning_curves(results, layout)
    copy_heatmaps(results, layout)
    plot_gains(results, layout)
    plot_estimators(results, layout)
    write_index_html(layout.results, blocks)


def write_report(plan: StudyPlan, layout: StudyLayout, categories: dict[str, str] | None = None) -> StudyResults:
    """Compute the study's results from its folders and render them; ``categories`` (default: the task folder's)
    give family precision."""
    from pipeline.validation import task_label_words
    from task_list import task_categories

    categories = task_categories(plan.p.task_dir) if categories is None else categories
    words = task_label_words(plan.p.task_dir, list(dict.fromkeys([*plan.task_pool, *plan.targets])))
    results = compute_results(layout, plan.deltas, plan.targets, plan.fusions, plan.data_seeds,
                              [iters for iters, _ in plan.budgets], categories, words)
    render(results, layout)
    return results
