"""The study's report: transferability figures on hand-computed cases."""

from __future__ import annotations

import math

from pipeline.report import fmt
from pipeline.results import family_precision
from pipeline.validation import ndcg_at


def test_family_precision_counts_only_tasks_with_a_category() -> None:
    weights = {"a": 0.5, "b": 0.3, "c": 0.15, "d": 0.05}
    categories = {"t": "x", "a": "x", "b": "y", "d": "x"}
    assert family_precision(weights, "t", categories) == 0.5  # top 3 = a, b, c; c has none: 1 of {a, b}
    assert family_precision(weights, "t", categories, k=4) == 2 / 3
    assert math.isnan(family_precision(weights, "unknown", categories))  # never None == None
    assert math.isnan(family_precision({"c": 1.0}, "t", categories))
    assert fmt(family_precision(weights, "unknown", categories)) == "-"


def test_ndcg_at_3_by_hand() -> None:
    relevance = {"a": 1.0, "b": 0.5, "c": 0.0}
    assert ndcg_at({"a": 3, "b": 2, "c": 1}, relevance) == 1.0
    reversed_dcg = 0.0 + 0.5 / math.log2(3) + 1.0 / math.log2(4)
    assert math.isclose(ndcg_at({"a": 1, "b": 2, "c": 3}, relevance), reversed_dcg / (1.0 + 0.5 / math.log2(3)))


def test_summary_md_and_the_page_render_the_same_blocks() -> None:
    """summary.md and index.html are two renderings of one list of blocks; the page never parses markdown."""
    from pipeline.html_page import blocks_html
    from pipeline.report import Block, markdown

    blocks = [Block("heading", "lora, iters 40: test score"), Block("paragraph", "3 targets, **9** cells <all>"),
              Block("table", header=("target", "random", "Loss"),
                    rows=(("a", "0.500", "0.600"), ("**mean**", "**0.500**", "**0.600**")))]
    assert markdown(blocks) == ("### lora, iters 40: test score\n\n3 targets, **9** cells <all>\n\n"
                                "| target | random | Loss |\n|---|---|---|\n| a | 0.500 | 0.600 |\n"
                                "| **mean** | **0.500** | **0.600** |\n\n")
    assert blocks_html(blocks) == [
        "<h3>lora, iters 40: test score</h3>", "<p>3 targets, <b>9</b> cells &lt;all&gt;</p>",
        "<table><tr><th>target</th><th>random</th><th>Loss</th></tr>",
        "<tr><td>a</td><td>0.500</td><td>0.600</td></tr>",
        "<tr><td><b>mean</b></td><td><b>0.500</b></td><td><b>0.600</b></td></tr>", "</table>"]
