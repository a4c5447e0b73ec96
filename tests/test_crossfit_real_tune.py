"""Real CrossFit tasks through tune.py with the embedded defaults of both families (skipped without the data)."""

from __future__ import annotations

import csv

import pytest

import tune
from tests.conftest import DEFAULT_MODEL_DIR, REAL_DATA_DIR, REPO
from utils.errors import run_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not REAL_DATA_DIR.is_dir(), reason=f"{REAL_DATA_DIR} not present"),
    pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="embedded default not built"),
]

# One task per metric family: ACC, Classification-F1, EM, QA-F1, Matthew-Correlation.
REAL_TASKS = ["glue-mrpc", "ag_news", "ade_corpus_v2-dosage", "tweet_qa", "glue-cola"]


# The causal default with every method on a label task (superglue-cb, ACC); LoRA and prefix (the method whose
# generation needed the most care: models/backbones/causal.py) also on free text (lama-squad, EM). Both have small
# test splits (56 and 61 examples): causal generation recomputes the whole sequence at every step.
CAUSAL = REPO / "models" / "default-causal"
RUNS = [(DEFAULT_MODEL_DIR, "lora", REAL_TASKS), (CAUSAL, "lora", ["superglue-cb", "lama-squad"]),
        (CAUSAL, "prefix", ["superglue-cb", "lama-squad"]), (CAUSAL, "adapter", ["superglue-cb"]),
        (CAUSAL, "ia3", ["superglue-cb"])]


@pytest.mark.parametrize("model,method,tasks", RUNS, ids=[f"{m.name}-{method}" for m, method, _ in RUNS])
def test_real_tasks_produce_result_rows(model, method, tasks, tmp_path, capsys):
    out = tmp_path / "real"
    code = run_cli(tune.main, [
        "--do_train", "--do_predict", "--tune_method", method, "--model", str(model), "--lora_r", "4",
        "--adapter_size", "8", "--prefix_length", "8", "--prefix_mlp", "32", "--task_dir", str(REAL_DATA_DIR),
        "--tasks", *tasks, "--k", "16", "--data_seed", "100", "--output_dir", str(out),
        "--train_iters", "2", "--valid_interval", "2", "--warmup_steps", "1", "--learning_rate_list", "1e-3",
        "--bsz_list", "4", "--max_input_length", "128", "--max_output_length", "8", "--quiet"])
    assert code == 0, capsys.readouterr().err
    with open(out / "result.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["task"] for r in rows] == tasks
    for row in rows:
        low = -1.0 if row["task"] == "glue-cola" else 0.0  # Matthews correlation can be negative
        assert low <= float(row["test"]) <= 1.0 and low <= float(row["dev"]) <= 1.0
        assert (out / row["task"] / row["run"] / "test_predictions.tsv").is_file()
