"""Same seed, same CPU, fresh processes: tune.py, get_similarity.score and the fusion scripts give the same
bytes in every output that carries a number (scores, checkpoints, weights).

tests/test_tune.py::test_same_seed_gives_identical_checkpoints compares checkpoint tensors of two runs in
one process; here each run is its own interpreter (nothing shared: no cached tokenizer, no RNG state left
over), the runs use the embedded default backbone whose dropout (0.1) draws random numbers in training,
and the files themselves are compared. Logs are left out: they hold wall-clock times.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from models.backbone import load_backbone
from models.delta import DeltaConfig, attach_delta, backbone_fingerprint, delta_state_dict, save_delta_checkpoint
from tests.conftest import DEFAULT_MODEL_DIR, REPO, SUITE_DIR, only_run

TASKS = ["sent_review", "sent_tweet", "topic_news"]


def run_twice(script: str, root: Path, argv_of: Callable[[Path], list[str]]) -> list[Path]:
    """Run ``script`` with ``argv_of(out)`` for two output folders under ``root``, each in a fresh interpreter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    outs = [root / name for name in ("first", "second")]
    procs = [subprocess.Popen([sys.executable, str(REPO / script), *argv_of(out)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for out in outs]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    return outs


def same_bytes(outs: list[Path], names: list[Path | str]) -> None:
    for name in names:
        a, b = (out / name for out in outs)
        assert a.is_file(), a
        assert a.read_bytes() == b.read_bytes(), f"{name} differs between two runs with the same seed"


@pytest.mark.slow
def test_tune_twice_gives_identical_scores_and_checkpoints(tmp_path: Path) -> None:
    outs = run_twice("tune.py", tmp_path, lambda out: [
        "--do_train", "--do_predict", "--tune_method", "lora", "--lora_r", "4", "--model", str(DEFAULT_MODEL_DIR),
        "--task_dir", str(SUITE_DIR), "--tasks", "sent_review", "topic_news", "--output_dir", str(out),
        "--train_iters", "6", "--valid_interval", "3", "--log_interval", "3", "--warmup_steps", "2",
        "--learning_rate_list", "3e-3", "--bsz_list", "4", "--max_output_length", "8", "--device", "cpu",
        "--quiet"])
    names: list[Path | str] = ["result.tsv"]
    for task in ("sent_review", "topic_news"):
        run = only_run(outs[0] / task).relative_to(outs[0])
        names += [run / "curve.tsv", run / "result.json", run / "test_predictions.tsv",
                  run / "checkpoint" / "delta.safetensors", run / "checkpoint" / "delta_config.json"]
    same_bytes(outs, names)
    # Training ran (the loss moved), so the comparison covers optimiser steps with dropout, not just loading.
    curve = (only_run(outs[0] / "sent_review") / "curve.tsv").read_text().splitlines()
    assert len(curve) == 4 and curve[2].split("\t")[2] != curve[3].split("\t")[2]


def make_modules(root: Path, tasks: list[str], seed: int) -> None:
    """A LoRA r=4 module per task on the embedded default, each moved off its initialisation differently."""
    cfg = DeltaConfig("lora", lora_r=4, lora_alpha=8)
    model, _ = load_backbone(DEFAULT_MODEL_DIR)
    torch.manual_seed(42)
    attach_delta(model, cfg)
    base = delta_state_dict(model)
    for i, task in enumerate(tasks):
        gen = torch.Generator().manual_seed(seed + i)
        tensors = {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        save_delta_checkpoint(root / task, tensors, cfg, DEFAULT_MODEL_DIR.name, backbone_fingerprint(model),
                              task=task)


@pytest.mark.slow
def test_score_twice_gives_identical_result_tsv(tmp_path: Path) -> None:
    make_modules(tmp_path / "sources", TASKS, seed=1)
    make_modules(tmp_path / "random", TASKS, seed=100)
    outs = run_twice("get_similarity/score.py", tmp_path, lambda out: [
        "--delta", "lora", "--metric", "all", "--tasks", *TASKS, "--source_ckpt_path", str(tmp_path / "sources"),
        "--random_tuned_ckpt_path", str(tmp_path / "random"), "--model", str(DEFAULT_MODEL_DIR),
        "--task_dir", str(SUITE_DIR), "--max_examples", "6", "--batch_size", "4", "--granularity", "block",
        "--output_dir", str(out), "--device", "cpu", "--quiet"])
    same_bytes(outs, ["result.tsv"])
    rows = (outs[0] / "result.tsv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 2 * 9 * 2  # targets x other sources x metrics (all nine apply to LoRA) x blocks
    assert len({r.split("\t")[-1] for r in rows[1:]}) > 20  # real, distinct scores


def test_fusion_twice_gives_identical_checkpoints_and_weights(tmp_path: Path) -> None:
    make_modules(tmp_path / "sources", TASKS, seed=1)
    table = tmp_path / "similarity.tsv"
    rows = [f"{t}\t{s}\tLoss\t{g}\t{1.0 + 0.37 * i + 0.11 * j}" for i, (t, s) in
            enumerate((t, s) for t in TASKS for s in TASKS if s != t) for j, g in enumerate(("encoder", "decoder"))]
    table.write_text("target\tsource\tmetric\tgroup\tscore\n" + "\n".join(rows) + "\n", encoding="utf-8")
    outs = run_twice("unit_model/unit_model_others.py", tmp_path, lambda out: [
        "--delta", "lora", "--tasks", *TASKS, "--source_ckpt_path", str(tmp_path / "sources"),
        "--result_tsv", str(table), "--metric", "Loss", "--granularity", "block", "--weight_norm", "none",
        "--save_ckpt_path", str(out)])  # raw scores: with two sources a z-score is always ±1
    names: list[Path | str] = ["weights.tsv"]
    for t in TASKS:
        names += [Path(f"without_{t}") / "delta.safetensors", Path(f"without_{t}") / "delta_config.json"]
    same_bytes(outs, names)
    lines = (outs[0] / "weights.tsv").read_text().splitlines()
    column = lines[0].split("\t").index("weight")
    weights = [float(line.split("\t")[column]) for line in lines[1:]]
    assert len(set(weights)) > 2  # weighted, not uniform: the SVD of Σ w ΔW is exercised with unequal weights
