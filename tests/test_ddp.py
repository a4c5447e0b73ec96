"""tune.py under `accelerate launch` with two CPU processes (gloo) against one process: same training.

The global batch stays --bsz: each process trains on its share, the gradients are summed after each
share's token-mean loss is weighted by its share of the batch's label tokens, and evaluation is sharded
and gathered. So two processes follow one process up to float32 summation order.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.formats import load_delta_checkpoint
from tests.conftest import DEFAULT_MODEL_DIR, REPO, only_run

TASK = "ext_animals"  # outputs of different lengths, so the token weighting of the shares matters
BSZ = 5  # 16 train examples: batches of 5, 5, 5, 1; shares of 2 and 3, and one empty share per epoch
ARGS = ["--do_train", "--do_predict", "--tune_method", "lora", "--lora_r", "4", "--tasks", TASK,
        "--train_iters", "10", "--valid_interval", "5", "--log_interval", "1", "--warmup_steps", "2",
        "--learning_rate_list", "3e-3", "--bsz_list", str(BSZ), "--save_last", "--quiet", "--log_file_only"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dropout_free_default(folder: Path) -> Path:
    """The embedded default without dropout: with dropout each process would draw its own masks for its share,
    and the runs would differ by dropout noise rather than by arithmetic."""
    folder.mkdir()
    for f in DEFAULT_MODEL_DIR.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    config["dropout_rate"] = 0.0
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def launch(argv: list[str], processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}  # CPU processes even on a GPU box
    if processes == 1:
        cmd = [sys.executable, "tune.py", *argv]
    else:
        script = Path(sys.executable).parent / "accelerate"
        launcher = [str(script), "launch"] if script.exists() else [sys.executable, "-m",
                                                                    "accelerate.commands.launch"]
        # On a machine without CUDA, --multi_gpu starts torch.distributed processes on the CPU (gloo);
        # `--cpu` alone would start a single process.
        cmd = [*launcher, "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "tune.py", *argv]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def losses(log: Path) -> list[float]:
    return [float(m) for m in re.findall(r"step \d+: loss ([0-9.]+)", log.read_text())]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def result_row(out: Path) -> dict[str, str]:
    rows = read_rows(out / "result.tsv")
    assert len(rows) == 1
    return rows[0]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate is not installed")
def test_two_cpu_processes_match_one_process(tmp_path):
    model = dropout_free_default(tmp_path / "backbone")
    outs = {n: tmp_path / f"procs{n}" for n in (1, 2)}
    for n, out in outs.items():
        done = launch([*ARGS, "--model", str(model), "--output_dir", str(out)], n)
        assert done.returncode == 0, done.stderr[-3000:]

    one, two = only_run(outs[1] / TASK), only_run(outs[2] / TASK)
    assert one.name == two.name
    # Rank 0 alone writes: one complete run folder, each log line once, no temporary leftovers.
    assert {p.name for p in two.iterdir()} == {"log.txt", "curve.tsv", "checkpoint", "test_predictions.tsv",
                                               "result.json"}
    assert not [p for p in outs[2].rglob(".*tmp*")]
    assert (two / "log.txt").read_text().count("step 5: dev") == 1

    # Training losses: the same global batches, so the logged batch losses agree at every step (measured:
    # equal to the 4 printed decimals; a plain average of the shares' means differs by 2.4 at step 1).
    loss1, loss2 = losses(one / "log.txt"), losses(two / "log.txt")
    assert len(loss1) == len(loss2) == 10
    assert loss1 == pytest.approx(loss2, abs=1e-3)

    # Checkpoints: float32 summation order differs (padding per share, the all-reduce), and Adam's division
    # by sqrt(v) magnifies that on entries whose gradients are near zero. Measured after 10 steps: relative
    # difference 2.4e-5, largest entry 1.4e-4 (2 of 24,576 entries over 1e-5). Averaging the shares' means
    # without token weights gives 2.9e-2 and 1.6e-2, so 1e-3 separates arithmetic noise from a wrong
    # gradient.
    a, meta_a = load_delta_checkpoint(one / "checkpoint")
    b, meta_b = load_delta_checkpoint(two / "checkpoint")
    assert a.keys() == b.keys() and meta_a["step"] == meta_b["step"] == 10
    flat_a = torch.cat([a[k].flatten() for k in sorted(a)])
    flat_b = torch.cat([b[k].flatten() for k in sorted(a)])
    assert ((flat_a - flat_b).norm() / flat_a.norm()).item() < 1e-3
    assert (flat_a - flat_b).abs().max().item() < 1e-3

    # Scores: sharded evaluation with gathered predictions. Measured equal; the tolerance lets one example
    # of a split change its prediction (Rouge-L is a mean over examples), nothing more.
    row1, row2 = result_row(outs[1]), result_row(outs[2])
    assert row1["best_step"] == row2["best_step"] == "10"
    assert float(row2["dev"]) == pytest.approx(float(row1["dev"]), abs=1 / 16)
    assert float(row2["test"]) == pytest.approx(float(row1["test"]), abs=1 / 200)
    preds1, preds2 = (read_rows(run / "test_predictions.tsv") for run in (one, two))
    assert [r["input"] for r in preds2] == [r["input"] for r in preds1]  # every share gathered, in order
    assert sum(p1["prediction"] != p2["prediction"] for p1, p2 in zip(preds1, preds2)) <= 1
