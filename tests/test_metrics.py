"""Metric values computed by hand, the documented edge-case rules, and the task -> metric lookup."""

import math
from pathlib import Path

import pytest

from dataloader.metrics import METRICS, TASK_METRICS, metric_for_task, normalize_answer, score
from utils.errors import UserInputError


def refs(*golds: str) -> list[list[str]]:
    return [[gold] for gold in golds]


def test_registry_names() -> None:
    assert set(METRICS) == {
        "ACC",
        "EM",
        "QA-F1",
        "Classification-F1",
        "Matthew-Correlation",
        "Pearson-Correlation",
        "Rouge-L",
    }
    assert set(TASK_METRICS.values()) <= set(METRICS)


def test_accuracy_case_insensitive_and_best_over_answers() -> None:
    assert score("ACC", [" Yes ", "no", "maybe", "b"], [["yes"], ["No"], ["no"], ["a", "B"]]) == 0.75
    assert score("ACC", ["the cat"], [["cat"]]) == 0.0  # no SQuAD normalisation in ACC


def test_normalize_answer() -> None:
    assert normalize_answer("  The  Eiffel-Tower, an icon! ") == "eiffeltower icon"


def test_exact_match() -> None:
    predictions = ["The Eiffel Tower.", "paris", "a dog", "theatre"]
    references = [["eiffel tower"], ["London", "Paris!"], ["cat"], ["theatre"]]
    assert score("EM", predictions, references) == 0.75


def test_qa_f1_partial_overlap() -> None:
    # pred tokens: new york city (3); gold: york city area now (4); overlap 2 -> P=2/3, R=1/2, F1=4/7.
    assert score("QA-F1", ["New York City"], [["the York city area now"]]) == pytest.approx(4 / 7)
    # Best over answers, then averaged with a miss: (1.0 + 0.0) / 2.
    assert score("QA-F1", ["blue", "red"], [["green", "Blue."], ["yellow"]]) == pytest.approx(0.5)
    # Tokens count with multiplicity; the article "a" is dropped: pred [b, b] vs gold [b, b, b] -> P=1,
    # R=2/3, F1=0.8.
    assert score("QA-F1", ["a b b"], [["b b b"]]) == pytest.approx(0.8)


def test_qa_f1_and_rouge_with_no_tokens() -> None:
    assert score("QA-F1", ["."], [["."]]) == 1.0
    assert score("QA-F1", ["!"], [["."]]) == 0.0
    assert score("QA-F1", ["the"], [["paris"]]) == 0.0
    assert score("Rouge-L", ["東京"], [["東京"]]) == 1.0
    assert score("Rouge-L", ["東京"], [["大阪"]]) == 0.0


def test_rouge_l_known_lcs() -> None:
    # LCS(the cat sat on mat | the cat was on the mat) = "the cat on mat" = 4; P=4/5, R=4/6 -> F=8/11.
    assert score("Rouge-L", ["the cat sat on mat"], [["the cat was on the mat"]]) == pytest.approx(8 / 11)
    assert score("Rouge-L", ["the cat sat on mat"], [["dogs bark", "The cat sat on mat"]]) == 1.0


def test_classification_f1_macro_by_hand() -> None:
    # gold a b b a, pred a b a c. F1(a)=1/2 (P=1/2, R=1/2), F1(b)=2/3 (P=1, R=1/2), F1(c)=0 -> 7/18.
    assert score("Classification-F1", ["a", "b", "a", "c"], refs("a", "b", "b", "a")) == pytest.approx(7 / 18)
    # Only the first gold answer counts; labels are case-sensitive after stripping.
    assert score("Classification-F1", [" pos", "neg"], [["pos", "neg"], ["neg"]]) == 1.0
    assert score("Classification-F1", ["Pos"], [["pos"]]) == 0.0
    assert score("Classification-F1", ["x", "x"], refs("x", "x")) == 1.0


def test_matthews_by_hand() -> None:
    # gold 1 1 0 0 / pred 1 0 0 0 as labels: TP=1 FN=1 TN=2 FP=0.
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 2 / sqrt(1 * 2 * 2 * 3) = 1/sqrt(3).
    value = score("Matthew-Correlation", ["acc", "un", "un", "un"], refs("acc", "acc", "un", "un"))
    assert value == pytest.approx(1 / math.sqrt(3))
    assert score("Matthew-Correlation", ["un", "un", "acc", "acc"], refs("acc", "acc", "un", "un")) == -1.0


def test_matthews_constant_gold() -> None:
    assert score("Matthew-Correlation", ["acc", "acc"], refs("acc", "acc")) == 1.0
    assert score("Matthew-Correlation", ["acc", "un"], refs("acc", "acc")) == 0.0


def test_pearson_by_hand_and_non_numeric_rule() -> None:
    assert score("Pearson-Correlation", ["1", "2", "3", "5"], refs("2", "4", "6", "10")) == pytest.approx(1.0)
    # "x" is replaced by the gold mean 2.5: pred 1 2 2.5 4 vs gold 1 2 3 4.
    # Centred: gold -1.5 -.5 .5 1.5, pred -1.375 -.375 .125 1.625 -> r = 4.75 / sqrt(5 * 4.6875).
    value = score("Pearson-Correlation", ["1", "2", "x", "4"], refs("1", "2", "3", "4"))
    assert value == pytest.approx(4.75 / math.sqrt(5 * 4.6875))
    assert score("Pearson-Correlation", ["a", "b", "nan", "inf"], refs("1", "2", "3", "4")) == 0.0


def test_pearson_degenerate_cases() -> None:
    assert score("Pearson-Correlation", ["3", "3.0"], refs("3", "3")) == 1.0
    assert score("Pearson-Correlation", ["3", "4"], refs("3", "3")) == 0.0
    assert score("Pearson-Correlation", ["3", "3"], refs("1", "2")) == 0.0
    assert score("Pearson-Correlation", ["2"], refs("2")) == 1.0
    assert score("Pearson-Correlation", ["5"], refs("2")) == 0.0
    with pytest.raises(UserInputError, match="numeric gold"):
        score("Pearson-Correlation", ["1", "2"], refs("1", "two"))


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_gold_scores_the_maximum(metric: str) -> None:
    golds = ["1", "2", "2.5", "4"] if metric == "Pearson-Correlation" else ["yes", "no", "no", "maybe"]
    assert score(metric, golds, refs(*golds)) == pytest.approx(1.0)
    constant = ["3", "3"]
    assert score(metric, constant, refs(*constant)) == pytest.approx(1.0)


def test_score_errors() -> None:
    with pytest.raises(UserInputError, match=r"unknown metric 'BLEU'.*ACC.*Rouge-L"):
        score("BLEU", ["a"], refs("a"))
    with pytest.raises(ValueError, match="2 predictions but 1"):
        score("ACC", ["a", "b"], refs("a"))
    with pytest.raises(ValueError):
        score("ACC", [], [])
    with pytest.raises(ValueError):
        score("ACC", ["a"], [[]])


def test_task_metrics_table_facts() -> None:
    assert TASK_METRICS["glue-mrpc"] == "ACC"
    assert TASK_METRICS["superglue-cb"] == "ACC"
    assert TASK_METRICS["ag_news"] == "Classification-F1"
    assert TASK_METRICS["glue-cola"] == "Matthew-Correlation"
    assert TASK_METRICS["tweet_qa"] == "QA-F1"


def test_metric_for_task_precedence(tmp_path: Path) -> None:
    (tmp_path / "task_metrics.tsv").write_text("task\tmetric\r\nglue-mrpc\tQA-F1\r\nsynth_a\tRouge-L\r\n\r\n")
    assert metric_for_task("glue-mrpc", tmp_path) == "QA-F1"  # tsv beats the table
    assert metric_for_task("synth_a", tmp_path) == "Rouge-L"
    assert metric_for_task("ag_news", tmp_path) == "Classification-F1"  # table
    assert metric_for_task("unknown_task", tmp_path) == "ACC"  # default
    assert metric_for_task("glue-cola", tmp_path / "no_such_dir") == "Matthew-Correlation"
    assert metric_for_task("glue-cola") == "Matthew-Correlation"


def test_metric_tsv_is_reread_after_edit(tmp_path: Path) -> None:
    path = tmp_path / "task_metrics.tsv"
    path.write_text("task\tmetric\nsynth\tEM\n")
    assert metric_for_task("synth", tmp_path) == "EM"
    path.write_text("task\tmetric\nsynth\tQA-F1\nother\tACC\n")
    assert metric_for_task("synth", tmp_path) == "QA-F1"


@pytest.mark.parametrize(
    ("text", "lineno", "fragment"),
    [
        ("task\tmetric\nsynth\tBLEU\n", 2, "unknown metric 'BLEU'"),
        ("name\tmetric\nsynth\tEM\n", 1, "header"),
        ("task\tmetric\nsynth\n", 2, "expected 'task<TAB>metric'"),
        ("task\tmetric\nsynth\tEM\nsynth\tACC\n", 3, "different metric"),
    ],
    ids=["unknown-metric", "bad-header", "one-field", "conflict"],
)
def test_bad_metric_tsv(tmp_path: Path, text: str, lineno: int, fragment: str) -> None:
    path = tmp_path / "task_metrics.tsv"
    path.write_text(text)
    with pytest.raises(UserInputError) as err:
        metric_for_task("synth", tmp_path)
    assert str(err.value).startswith(f"{path.resolve()}:{lineno}: ")
    assert fragment in str(err.value)
