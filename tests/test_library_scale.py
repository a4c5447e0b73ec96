"""bench/library_scale.py in its --quick mode: two-stage retrieval over N modules, the fusion of those retrieved,
the cost per source and the parameter-space stage (its own file, so that pytest-xdist can run it beside the other
benchmarks' tests)."""

from __future__ import annotations

from pathlib import Path

from bench import library_scale
from tests.test_bench import column, number, read_tables


def test_library_scale_quick(tmp_path: Path) -> None:
    """Two-stage retrieval over N modules, the fusion of those retrieved, and the costs per source."""
    assert library_scale.main(["--quick", "--n", "4", "25", "--results_dir", str(tmp_path)]) == 0
    runs, goals, costs, streamed = read_tables(tmp_path / "library_scale.md")
    assert column(runs, "N modules") == ["4", "25"]
    assert all(number(x) > 0 for x in column(runs, "total s"))
    [time_goal, *memory_goals, exponent] = goals[1]
    assert time_goal[2] == ("yes" if number(time_goal[1]) <= 300 else "no")
    for goal in memory_goals:
        assert goal[2] == ("yes" if number(goal[1]) <= 1.2 else "no")
    assert exponent[1].startswith("b = ")
    [cost] = costs[1]
    loss_ms, arrow_ms = number(cost[2]), number(cost[3])
    assert abs(number(cost[5]) - loss_ms / arrow_ms) <= 1  # the ratio is the two columns'
    assert column(streamed, streamed[0][0]) == ["4", "25"]
    assert all(number(x) > 0 for x in column(streamed, "ms per module"))
