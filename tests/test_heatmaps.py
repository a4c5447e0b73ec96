"""Fusion heatmaps stay readable from 1 to 100 targets and sources (no overlapping labels, a title inside the
figure), titles state only the settings that apply, signed weights get a summary that fits them, and the
study's file names are portable."""

from __future__ import annotations

import random

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from pipeline.layout import fusion_file_name  # noqa: E402
from unit_model.fusion import heatmap_figure, weights_summary  # noqa: E402
from unit_model.weightings.base import Plan, effective_sources  # noqa: E402


def plans_of(n_targets: int, n_sources: int, signed: bool = False, seed: int = 0) -> list[Plan]:
    rng = random.Random(seed)
    names = [f"task_with_a_longish_name_{i:03d}" for i in range(max(n_targets, n_sources) + 1)]
    plans = []
    for t in names[:n_targets]:
        sources = [s for s in names if s != t][:n_sources]
        raw = [rng.uniform(-1, 1) if signed else rng.random() for _ in sources]
        total = 1.0 if signed else sum(raw)
        plans.append(Plan(target=t, sources=sources, modules=[], weights={s: {"all": w / total}
                                                                           for s, w in zip(sources, raw)}))
    return plans


def overlaps(boxes) -> bool:
    boxes = sorted(boxes, key=lambda b: (b.x0, b.y0))
    return any(a.overlaps(b) and a.intersection(a, b).width > 0.5 and a.intersection(a, b).height > 0.5
               for i, a in enumerate(boxes) for b in boxes[i + 1:])


@pytest.mark.parametrize("n_targets,n_sources", [(1, 3), (2, 19), (6, 19), (30, 30), (100, 100)])
def test_labels_do_not_overlap_and_the_title_fits(n_targets, n_sources):
    title = ("learned:Loss fusion weights (lora; 12.3 effective sources by |w|; 29 of 57 weights negative, "
             "mean sum 2.67)")
    plans = plans_of(n_targets, n_sources)
    fig = heatmap_figure(plans, title)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        figure_box = fig.bbox
        ylabels = [t.get_window_extent(renderer) for t in ax.get_yticklabels() if t.get_text()]
        xlabels = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
        assert len(ylabels) == n_targets and len(xlabels) == len({s for p in plans for s in p.sources})
        assert not overlaps(ylabels) and not overlaps(xlabels)
        axis_label = ax.yaxis.label.get_window_extent(renderer)
        assert not any(axis_label.overlaps(b) for b in ylabels)  # the y axis label stays clear of the tick labels
        title_box = ax.title.get_window_extent(renderer)
        assert figure_box.x0 <= title_box.x0 and title_box.x1 <= figure_box.x1 and title_box.y1 <= figure_box.y1
        for box in ylabels + xlabels:
            assert figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1 and box.y0 >= figure_box.y0
    finally:
        plt.close(fig)


def test_signed_weights_get_a_summary_that_fits_them():
    plans = plans_of(2, 4, signed=True, seed=3)
    effective = {p.target: {"all": effective_sources(w["all"] for w in p.weights.values())} for p in plans}
    text = weights_summary(plans, effective)
    negative = sum(1 for p in plans for w in p.weights.values() if w["all"] < 0)
    assert f"{negative} of 8 weights negative" in text and "by |w|" in text
    total = sum(sum(w["all"] for w in p.weights.values()) for p in plans) / 2
    assert f"mean sum {total:.2f}" in text
    positive = plans_of(2, 4)
    effective = {p.target: {"all": effective_sources(w["all"] for w in p.weights.values())} for p in positive}
    assert weights_summary(positive, effective).endswith("effective sources")
    assert "negative" not in weights_summary(positive, effective)


def test_fusion_file_names_are_portable():
    for name in ("learned:Loss", "Loss+ties@original", "average"):
        made = fusion_file_name(name)
        assert not set(made) & set(':*?"<>|\\/')
    assert fusion_file_name("learned:Loss") == "learned_from_Loss"
    assert len({fusion_file_name(n) for n in ("learned", "learned:Loss", "learned:uniform")}) == 3
