"""The study's fusion-name grammar, WEIGHTING[:START][+OPERATOR][@original], on hand-written cases."""

from __future__ import annotations

import pytest

from unit_model.fusion_names import Fusion, parse_fusion
from unit_model.merges import MERGES
from unit_model.weightings import get_weighting, study_weightings
from utils.errors import UserInputError


@pytest.mark.parametrize(("name", "weighting", "operator", "start", "original"), [
    ("Loss", "Loss", "linear", None, False),
    ("average+ties", "average", "ties", None, False),
    ("learned", "learned", "linear", "zeros", False),
    ("learned:Loss+dare_ties", "learned", "dare_ties", "Loss", False),
    ("cos@original", "cos", "linear", None, True),
    ("GraNd+ties@original", "GraNd", "ties", None, True),
])
def test_names_parse_into_weighting_operator_start_and_rule(name, weighting, operator, start, original) -> None:
    assert parse_fusion(name) == Fusion(name, get_weighting(weighting), MERGES[operator], start, original)


def test_what_a_fusion_reads_and_whether_it_ranks() -> None:
    assert parse_fusion("learned:KL").reads.name == "KL"  # its start needs KL's similarity table
    assert parse_fusion("learned:KL").inputs == ("similarity",)
    assert parse_fusion("learned:uniform").reads.name == "learned"
    assert parse_fusion("learned:uniform").inputs == ()
    assert parse_fusion("Performance+ties").inputs == ("tuneall", "devall")
    assert [parse_fusion(n).weighting.ranks_sources for n in ("average", "manual+ties", "Loss", "learned")] == [
        False, False, True, True]


def test_the_original_temperatures_are_the_original_codes() -> None:
    temperatures = {n: get_weighting(n).original_temperature for n in study_weightings()}
    assert temperatures == {"average": None, "manual": None, "learned": None, "Loss": 0.1, "KL": 0.1, "EL2N": 0.1,
                            "LogitsCos": 0.1, "GraNd": 0.1, "LEEP": 0.1, "LogME": 0.1, "Arrow": 0.1,
                            "GradAlign": 0.1, "Euclidean": 0.1, "Performance": 0.001, "cos": 0.001}


def test_the_metric_weightings_are_the_metric_registrys() -> None:
    from get_similarity.metrics import METRICS

    assert [n for n in study_weightings() if get_weighting(n).config.get("metric")] == list(METRICS)


@pytest.mark.parametrize(("name", "message"), [
    ("Los", "unknown fusion method 'Los'"),
    ("Loss+tie", "unknown merge operator 'tie'"),
    ("Loss@orig", "the only suffix is @original"),
    ("average@original", "not to average"),
    ("learned@original", "not to learned"),
    ("Loss:KL", "only a learned weighting takes a start"),
    ("learned:cos", "starts from 'cos'"),
])
def test_a_name_outside_the_grammar_is_refused_with_the_flag_and_the_name(name: str, message: str) -> None:
    with pytest.raises(UserInputError, match="--fusions") as e:
        parse_fusion(name)
    assert message in str(e.value) and name in str(e.value)


@pytest.mark.parametrize(("argv", "message"), [
    (["--fusions", "average Loss@orig"], "--fusions: 'Loss@orig' ends in @orig"),
    (["--fusions", "learned+ties", "--learned_optimizer", "gradient"],
     "--fusions learned+ties: --learned_optimizer gradient: --merge ties has no gradient in its weights"),
    (["--learned_optimizer", "adam"], "--learned_optimizer: expected one of nevergrad, gradient"),
])
def test_the_study_refuses_a_bad_fusion_before_it_writes_anything(tmp_path, capsys, argv, message) -> None:
    import study
    from utils.errors import run_cli

    assert run_cli(study.main, ["--output", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
