"""The study's report: transferability figures on hand-computed cases."""

from __future__ import annotations

import math

import pytest

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


# --- the estimators' validation ---------------------------------------------------------------------------


def test_rank_statistics_by_hand() -> None:
    from scipy.stats import kendalltau

    from pipeline.validation import rank_statistics

    transfer = {"a": 0.9, "b": 0.5, "c": 0.7, "d": 0.1}
    perfect = rank_statistics({"a": 4, "b": 2, "c": 3, "d": 1}, transfer)
    assert perfect[:2] == (1.0, 1.0) and perfect[2] == 1.0 and perfect[3] == 0.0
    # Ranks c first: regret 0.9 - 0.7; one swapped pair (a, c) of six: τ = (5 - 1) / 6.
    swapped = rank_statistics({"a": 3, "b": 2, "c": 4, "d": 1}, transfer)
    assert swapped[1] == kendalltau([3, 2, 4, 1], [0.9, 0.5, 0.7, 0.1]).statistic == pytest.approx(4 / 6)
    assert swapped[3] == pytest.approx(0.9 - 0.7)
    # Only the sources both sides have count; tied scores leave the rank correlations undefined, not 0.
    tied = rank_statistics({"a": 1.0, "b": 1.0, "z": 5.0}, transfer)
    assert math.isnan(tied[0]) and math.isnan(tied[1]) and tied[3] == 0.0  # tie broken by name: a first


def test_read_similarity_orients_scores_and_skips_unknowns(tmp_path) -> None:
    from pipeline.validation import read_similarity

    table = tmp_path / "result.tsv"
    table.write_text("target\tsource\tmetric\tgroup\tscore\n"
                     "t\ta\tLoss\tencoder\t2.0\nt\ta\tLoss\tdecoder\t4.0\n"  # lower is better: -(2 + 4) / 2
                     "t\ta\tLogME\tmodel\t-\nt\tb\tLogME\tmodel\t-0.5\n")
    read = read_similarity(table)
    assert read["Loss"]["t"] == {"a": -3.0}
    assert read["LogME"]["t"] == {"b": -0.5}  # a's unknown score is not a value


def test_label_word_shares_by_hand() -> None:
    from pipeline.validation import label_word_groups, label_word_shares

    words = {"t": {"true", "false"}, "w1": {"true", "false"}, "w2": {"false", "maybe"}, "k1": {"yes", "no"},
             "k2": {"pos", "neg"}, "x": {"red"}}
    categories = {"t": "sent", "w1": "topic", "w2": "nli", "k1": "sent", "k2": "sent", "x": "topic"}
    sources = ["k1", "k2", "w1", "w2", "x"]
    assert label_word_groups("t", sources, words, categories) == (["w1", "w2"], ["k1", "k2"])
    assert label_word_groups("k1", ["w1", "k2"], words, categories) is None  # no source shares k1's words
    single = {13: {"t": {"k1": 0.6, "k2": 0.8, "w1": 0.5, "w2": 0.3, "x": 0.2}}}
    weights = {"M": {13: {"t": {"k1": 0.1, "k2": 0.1, "w1": 0.4, "w2": 0.2, "x": 0.2}}}}
    shares = {s.fusion: s for s in label_word_shares("lora", ["M"], weights, single, {13: {"t": 0.4}}, words,
                                                     categories)}
    assert shares["M"].cells == 1
    assert shares["M"].label_word.mean_gain == pytest.approx(0.6) and shares["M"].skill.mean_gain == pytest.approx(0.2)
    assert shares["uniform"].label_word.mean_gain == pytest.approx(2 / 5)
    assert shares["tuned alone"].label_word.mean_gain == pytest.approx((0.1 - 0.1) / 2)
    assert shares["tuned alone"].skill.mean_gain == pytest.approx((0.2 + 0.4) / 2)


def test_member_gaps_by_hand() -> None:
    from pipeline.validation import member_gaps

    single = {13: {"t": {"a": 0.5, "b": 0.8, "c": 0.6}}, 42: {"t": {"a": 0.7, "b": 0.4, "c": 0.1}}}
    weights = {"F": {13: {"t": {"a": 0.5, "b": 0.0, "c": 0.5}}, 42: {"t": {"a": 1.0, "b": 0.0, "c": 0.0}}}}
    fused = {"F": {("t", 13): 0.9, ("t", 42): 0.6}}
    (gap,) = member_gaps("lora", ["F"], fused, weights, single)
    assert gap.cells == 2
    assert gap.over_best_member.mean_gain == pytest.approx(((0.9 - 0.6) + (0.6 - 0.7)) / 2)
    assert gap.to_oracle.mean_gain == pytest.approx(((0.9 - 0.8) + (0.6 - 0.7)) / 2)
