"""The benchmarks in bench/ run end to end in their --quick mode and write sane markdown tables."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bench import (
    cli_startup,
    eval_speed,
    fusion,
    gpu_bench,
    grouped,
    library_scale,
    load_sources,
    similarity,
    threads,
    trainer_overhead,
)
from tests.conftest import REPO
from utils.errors import run_cli

BENCHES = [trainer_overhead, similarity, fusion, eval_speed, load_sources, gpu_bench, grouped, threads, cli_startup,
           library_scale]


def read_tables(path: Path) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table of a report: (header, rows)."""
    tables, current = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if current is None:
                current = (cells, [])
                tables.append(current)
            elif not set("".join(cells)) <= {"-"}:
                current[1].append(cells)
        else:
            current = None
    return tables


def column(table: tuple[list[str], list[list[str]]], name: str) -> list[str]:
    header, rows = table
    return [row[header.index(name)] for row in rows]


def number(text: str) -> float:
    return float(text.replace(",", "").rstrip("x%"))


@pytest.mark.parametrize("bench", BENCHES, ids=lambda m: m.__name__.split(".")[-1])
def test_help_names_quick_mode(bench, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        bench.main(["--help"])
    assert stop.value.code == 0
    assert "--quick" in capsys.readouterr().out


@pytest.mark.slow
def test_trainer_overhead_quick(tmp_path: Path) -> None:
    assert trainer_overhead.main(["--quick", "--methods", "lora", "prefix", "--results_dir", str(tmp_path)]) == 0
    [table] = read_tables(tmp_path / "trainer_overhead.md")
    assert table[0] == ["backbone", "method", "steps/run", "block", "repeats", "tune.py ex/CPU-s",
                        "hand loop ex/CPU-s", "overhead (CPU)", "ratio spread", "overhead (wall)", "<= 10%"]
    assert column(table, "method") == ["lora", "prefix"]
    assert column(table, "backbone") == ["default", "default"]
    for tune_rate, hand, overhead, ok in zip(column(table, "tune.py ex/CPU-s"), column(table, "hand loop ex/CPU-s"),
                                             column(table, "overhead (CPU)"), column(table, "<= 10%")):
        assert number(tune_rate) > 0 and number(hand) > 0
        assert abs(number(overhead) / 100 - (number(hand) / number(tune_rate) - 1)) < 0.02  # one repeat: the ratio
        assert ok == ("yes" if number(overhead) <= 10 else "no")
    assert all(-100 < number(x) < 1000 for x in column(table, "overhead (wall)"))


def test_trainer_overhead_refuses_steps_off_the_block(tmp_path: Path, capsys) -> None:
    assert run_cli(trainer_overhead.main, ["--quick", "--steps_default", "7", "--results_dir", str(tmp_path)]) == 2
    assert "--steps_default: 7 is not a multiple of 5" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_similarity_quick(tmp_path: Path) -> None:
    assert similarity.main(["--quick", "--n", "2", "--results_dir", str(tmp_path)]) == 0
    [table] = read_tables(tmp_path / "similarity.md")
    assert table[0][:6] == ["dev examples", "N sources", "one process CPU s", "N processes CPU s", "ratio (CPU)",
                            "ratio (wall)"]
    [row] = table[1]
    one, separate, ratio = number(row[2]), number(row[3]), number(row[4])
    assert row[:2] == ["16", "2"]
    assert abs(ratio - separate / one) < 0.06
    assert ratio > 1.2  # two interpreter starts and backbone loads cost more than one


@pytest.mark.slow
def test_grouped_quick(tmp_path: Path) -> None:
    assert grouped.main(["--quick", "--results_dir", str(tmp_path)]) == 0
    table, sweep = read_tables(tmp_path / "grouped.md")
    assert [(row[0], row[2]) for row in sweep[1]] == [("similar lengths (suite)", "1"),
                                                     ("similar lengths (suite)", "auto")]
    assert column(sweep, "CPU ratio vs 1")[0] == "1.00x"
    assert table[0][:5] == ["stage", "G", "CPU s (process)", "wall s", "CPU ratio vs G=1"]
    assert [(row[0], row[1]) for row in table[1]] == [("tune-all", "1"), ("tune-all", "3"), ("similarity", "1"),
                                                      ("similarity", "3")]
    for row in table[1]:
        assert number(row[4]) == pytest.approx(number(column(table, "CPU s (process)")[0 if row[0] == "tune-all"
                                                                                           else 2]) / number(row[2]),
                                               abs=0.02)
    assert column(table, "goal (process CPU)")[0] == "-"


@pytest.mark.slow
def test_fusion_quick(tmp_path: Path) -> None:
    assert fusion.main(["--quick", "--methods", "lora", "--results_dir", str(tmp_path)]) == 0
    [table] = read_tables(tmp_path / "fusion.md")
    assert column(table, "method") == ["lora (delta_w)", "lora (params)"]
    assert column(table, "N") == ["3", "3"]
    for mb, secs, per_module, extra in zip(column(table, "MB/module (file)"), column(table, "fusion CPU s"),
                                           column(table, "CPU s/module"), column(table, "peak - baseline MB")):
        assert 0.1 < number(mb) < 1  # 24 LoRA pairs of r=8 on d_model 128, float32: 0.19 MB
        assert number(secs) > 0 and abs(number(per_module) - number(secs) / 3) < 0.01
        assert number(extra) >= 0


@pytest.mark.slow
def test_eval_speed_quick(tmp_path: Path) -> None:
    assert eval_speed.main(["--quick", "--results_dir", str(tmp_path)]) == 0
    share, comparisons = read_tables(tmp_path / "eval_speed.md")
    assert column(share, "validation") == ["full", "auto", "rank"]
    for train, valid, pct in zip(column(share, "train() CPU s"), column(share, "of which validation"),
                                 column(share, "validation share")):
        assert 0 < number(valid) < number(train)
        assert abs(number(pct) - 100 * number(valid) / number(train)) <= 1
    assert column(share, "validations") == ["6", "6", "6"]  # 2 tasks x (step 0, step 5, step 10)
    rows = {row[0].split(" ")[0]: row for row in comparisons[1]}
    header = comparisons[0]
    same = header.index("same predictions")
    assert rows["file"][1] == "2" and rows["max_new_tokens"][1] == "1" and rows["generation"][1] == "1"
    for row in rows.values():
        assert 0.0 <= number(row[same]) <= 1.0
        assert number(row[header.index("A CPU s")]) > 0 and number(row[header.index("B CPU s")]) > 0
    # Batch order changes padding and so float32 rounding; greedy predictions may flip only at near-ties (none
    # on the machine this was written on), so nearly all agree.
    assert number(rows["file"][same]) >= 0.9


@pytest.mark.slow
def test_load_sources_quick(tmp_path: Path) -> None:
    assert load_sources.main(["--quick", "--results_dir", str(tmp_path)]) == 0
    runs, verdict = read_tables(tmp_path / "load_sources.md")
    assert column(runs, "N sources") == ["3", "6"]
    peaks = [number(x) for x in column(runs, "peak MB")]
    baselines = [number(x) for x in column(runs, "baseline MB")]
    assert all(p >= b > 100 for p, b in zip(peaks, baselines))  # torch and the backbone are in the baseline
    [row] = verdict[1]
    assert row[0] == "lora" and abs(number(row[1]) - peaks[1] / peaks[0]) < 0.002
    assert row[2] == ("yes" if number(row[1]) <= 1.2 else "no")


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry_run", "--methods", "lora", "prefix"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [table] = read_tables(tmp_path / "gpu_dry_run.md")
    assert column(table, "method") == ["lora", "lora", "prefix", "prefix", "lora", "lora"]
    assert column(table, "what")[0] == "train, batch 4"
    assert column(table, "what")[4:] == ["grouped train, G=1, batch 4 each", "grouped train, G=2, batch 4 each"]
    assert all(number(rate) > 0 for rate in column(table, "rate"))
    assert set(column(table, "peak GPU MB")) == {"-"}


def test_gpu_bench_needs_cuda_without_dry_run(tmp_path: Path, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert run_cli(gpu_bench.main, ["--methods", "lora", "--results_dir", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_threads_quick(tmp_path: Path) -> None:
    assert threads.main(["--quick", "--results_dir", str(tmp_path)]) == 0
    [table] = read_tables(tmp_path / "threads.md")
    assert [(row[0], row[1]) for row in table[1]] == [("alone", "default (one per core)"), ("alone", "1"),
                                                     ("beside a neighbour", "default (one per core)"),
                                                     ("beside a neighbour", "1")]
    assert column(table, "vs alone at the same threads")[:2] == ["1.00x", "1.00x"]
    assert all(number(w) > 0 for w in column(table, "wall s"))


@pytest.mark.slow
def test_cli_startup_quick(tmp_path: Path) -> None:
    assert cli_startup.main(["--quick", "--results_dir", str(tmp_path)]) == 0
    [table] = read_tables(tmp_path / "cli_startup.md")
    assert column(table, "entry point") == ["tune.py"]
    assert number(column(table, "--help s")[0]) > 0 and column(table, "goal")[0].startswith("<= 1.5: ")

