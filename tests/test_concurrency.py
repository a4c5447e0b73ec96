"""Runs that share an output folder: concurrent tune.py processes never lose a run or a row.

A run's folder name carries its whole identity (models/run_folders.py), a run claims its folder before training,
and result.tsv is rewritten under a file lock. So two processes that differ in any setting both survive, each
with its own folder and row; two processes of the very same run cannot both write it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.run_folders import claimed, read_result_tsv
from tests.conftest import REPO
from tests.test_tune import FAST, GOOD, make_task
from utils.errors import UserInputError

pytestmark = pytest.mark.cli


def start_tune(backbone: Path, data: Path, out: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, str(REPO / "tune.py"), "--do_train", "--do_predict", "--tune_method", "lora", "--lora_r",
            "2", "--model", str(backbone), "--task_dir", str(data), "--tasks", "alpha", "--output_dir", str(out),
            "--device", "cpu", "--quiet", *FAST, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    make_task(tmp_path / "data", "alpha", {"train": GOOD, "dev": GOOD, "test": GOOD})
    return tmp_path / "data"


def test_two_seeds_at_once_into_one_output_dir_both_survive(tiny_backbone_dir, data, tmp_path):
    out = tmp_path / "out"
    procs = [start_tune(tiny_backbone_dir, data, out, "--seed", seed) for seed in ("1", "2")]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    rows = read_result_tsv(out / "result.tsv")
    assert sorted(r["seed"] for r in rows) == ["1", "2"]
    assert len({r["run"] for r in rows}) == 2
    for row in rows:
        run = out / "alpha" / row["run"]
        assert (run / "checkpoint" / "delta.safetensors").is_file() and (run / "test_predictions.tsv").is_file()
    assert sorted(p.name for p in (out / "alpha").iterdir()) == sorted(r["run"] for r in rows)  # no claim left


def test_the_same_run_twice_at_once_is_written_once(tiny_backbone_dir, data, tmp_path):
    """Both processes ask for one run: one writes it, the other is refused in one line (the run is claimed by
    the first, or already exists when the second gets there), whatever the timing."""
    out = tmp_path / "out"
    procs = [start_tune(tiny_backbone_dir, data, out) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 2], [err[-2000:] for _, err in results]
    refused = next(err for p, (_, err) in zip(procs, results) if p.returncode == 2)
    assert len(refused.strip().splitlines()) == 1 and "Traceback" not in refused
    assert "another process is making this very run" in refused or "run folder exists" in refused
    assert len(read_result_tsv(out / "result.tsv")) == 1


def test_a_claim_refuses_a_second_claimant_and_is_released(tmp_path):
    run = tmp_path / "out" / "alpha" / "lr_x"
    with claimed([run]):
        with pytest.raises(UserInputError, match="another process is making this very run"):
            with claimed([run]):
                pass
        assert (tmp_path / "out" / "alpha" / ".lr_x.claim").is_file()
    # released: the claim file and the folders made for it are gone, and it can be claimed again
    assert not (tmp_path / "out").exists()
    with claimed([run]):
        run.mkdir()
    assert [p.name for p in (tmp_path / "out" / "alpha").iterdir()] == ["lr_x"]
