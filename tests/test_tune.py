"""tune.py end to end on a tiny random backbone: outputs, checkpoints, resumable result rows, bad input."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tune
from models.formats import load_delta_checkpoint
from models.run_folders import RESULT_COLUMNS
from tests.conftest import REPO, SUITE_DIR, only_run
from utils.errors import run_cli

FAST = ["--train_iters", "4", "--valid_interval", "2", "--log_interval", "2", "--warmup_steps", "1",
        "--learning_rate_list", "1e-3", "--bsz_list", "4", "--max_output_length", "4", "--quiet"]


def make_task(root: Path, task: str, lines: dict[str, str], k: int = 16, seed: int = 100) -> None:
    (root / task).mkdir(parents=True, exist_ok=True)
    for split, text in lines.items():
        (root / task / f"{task}_{k}_{seed}_{split}.tsv").write_text(text, encoding="utf-8")


GOOD = "the cat sat\tyes\nthe dog ran\tno\na red fox\tyes\nblue sky\tno\tnope\n"


@pytest.fixture()
def task_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for task in ("alpha", "beta"):
        make_task(root, task, {"train": GOOD, "dev": GOOD, "test": GOOD})
    return root


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = run_cli(tune.main, argv)
    return code, capsys.readouterr().err


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.mark.parametrize("method", ["adapter", "lora", "prefix", "ia3"])
def test_train_predict_writes_run_folders_and_rows(method, family_backbone_dir, task_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(["--do_train", "--do_predict", "--tune_method", method, "--model", str(family_backbone_dir),
                     "--task_dir", str(task_dir), "--tasks", "alpha", "beta", "--output_dir", str(out),
                     "--lora_r", "2", "--prefix_length", "3", "--prefix_mlp", "8", "--adapter_size", "4", *FAST],
                    capsys)
    assert code == 0, err
    rows = read_rows(out / "result.tsv")
    assert [r["task"] for r in rows] == ["alpha", "beta"]
    assert list(rows[0]) == RESULT_COLUMNS
    for row in rows:
        run_dir = out / row["task"] / row["run"]
        assert row["run"].startswith("lr_0.001_bsz_4_k_16_data_100_seed_42_")
        assert {p.name for p in run_dir.iterdir()} == {"log.txt", "curve.tsv", "checkpoint", "test_predictions.tsv",
                                                       "result.json"}
        tensors, meta = load_delta_checkpoint(run_dir / "checkpoint")
        assert meta["method"] == method and meta["task"] == row["task"]
        assert meta["score"] == pytest.approx(float(row["dev"]), abs=1e-4)
        assert meta["step"] == int(row["best_step"])
        assert all(n.count(".delta.") or ".delta." in n for n in tensors)
        predictions = read_rows(run_dir / "test_predictions.tsv")
        assert len(predictions) == 4 and predictions[3]["gold"] == "no"
        curve = read_rows(run_dir / "curve.tsv")
        assert [c["step"] for c in curve] == ["0", "2", "4"]
        assert "step 2: loss" in (run_dir / "log.txt").read_text()
    # nothing temporary is left beside the run folders
    assert not [p for p in out.rglob(".*tmp*")]


def test_train_checkpoint_round_trip_and_predict_only(family_backbone_dir, task_dir, tmp_path, capsys):
    """A checkpoint trained once predicts the same test score when loaded with --test_checkpoint."""
    out = tmp_path / "out"
    base = ["--tune_method", "lora", "--lora_r", "2", "--model", str(family_backbone_dir), "--task_dir", str(task_dir),
            "--tasks", "alpha", *FAST]
    assert run(["--do_train", "--do_predict", "--output_dir", str(out), *base], capsys)[0] == 0
    ckpt = only_run(out / "alpha") / "checkpoint"
    out2 = tmp_path / "predict"
    code, err = run(["--do_predict", "--test_checkpoint", str(out / "alpha"), "--output_dir", str(out2), *base], capsys)
    assert code == 0, err
    first, second = read_rows(out / "result.tsv")[0], read_rows(out2 / "result.tsv")[0]
    assert second["lr"] == "-" and second["test"] == first["test"] and second["dev"] == first["dev"]
    # --train_checkpoint starts from the checkpoint: step 0 of the curve is its dev score
    out3 = tmp_path / "continued"
    assert run(["--do_train", "--train_checkpoint", str(ckpt), "--output_dir", str(out3), *base], capsys)[0] == 0
    curve = read_rows(only_run(out3 / "alpha") / "curve.tsv")
    assert curve[0]["dev"] == first["dev"]


def test_sweep_runs_every_lr_and_bsz_and_replaces_rows(tiny_backbone_dir, task_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--do_train", "--tune_method", "adapter", "--adapter_size", "4", "--model", str(tiny_backbone_dir),
            "--task_dir", str(task_dir), "--tasks", "alpha", "--output_dir", str(out), *FAST,
            "--learning_rate_list", "1e-3", "2e-3", "--bsz_list", "2", "4"]
    assert run(argv, capsys)[0] == 0
    rows = read_rows(out / "result.tsv")
    assert sorted((r["lr"], r["bsz"]) for r in rows) == [("0.001", "2"), ("0.001", "4"), ("0.002", "2"),
                                                         ("0.002", "4")]
    assert all(r["test"] == "-" for r in rows)  # no --do_predict
    # a rerun refuses to clobber, and with --overwrite replaces rows instead of appending
    code, err = run(argv, capsys)
    assert code == 2 and "--overwrite" in err
    assert run([*argv, "--overwrite"], capsys)[0] == 0
    assert len(read_rows(out / "result.tsv")) == 4


def test_same_seed_gives_identical_checkpoints(tiny_backbone_dir, task_dir, tmp_path, capsys):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert run(["--do_train", "--tune_method", "lora", "--lora_r", "2", "--model", str(tiny_backbone_dir),
                    "--task_dir", str(task_dir), "--tasks", "alpha", "--output_dir", str(out), *FAST], capsys)[0] == 0
    a, _ = load_delta_checkpoint(only_run(outs[0] / "alpha") / "checkpoint")
    b, _ = load_delta_checkpoint(only_run(outs[1] / "alpha") / "checkpoint")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_data_seeds_in_one_output_folder_keep_both_runs(tiny_backbone_dir, task_dir, tmp_path, capsys):
    """Each split's run has its own folder and row; a task folder holding both is then ambiguous."""
    make_task(task_dir, "alpha", {"train": GOOD, "dev": GOOD, "test": GOOD}, seed=13)
    out = tmp_path / "out"
    base = ["--do_train", "--tune_method", "lora", "--lora_r", "2", "--model", str(tiny_backbone_dir),
            "--task_dir", str(task_dir), "--tasks", "alpha", "--output_dir", str(out), "--seed", "7", *FAST]
    for data_seed in ("100", "13"):
        assert run([*base, "--data_seed", data_seed], capsys)[0] == 0
    rows = read_rows(out / "result.tsv")
    assert [(r["data_seed"], r["seed"], r["method"]) for r in rows] == [("100", "7", "lora"), ("13", "7", "lora")]
    for data_seed in ("100", "13"):
        tensors, meta = load_delta_checkpoint(only_run(out / "alpha", f"lr_*_data_{data_seed}_*") / "checkpoint")
        assert meta["extra"]["data_seed"] == int(data_seed)
    code, err = run(["--do_predict", "--test_checkpoint", str(out / "alpha"), "--tune_method", "lora", "--lora_r",
                     "2", "--model", str(tiny_backbone_dir), "--task_dir", str(task_dir), "--tasks", "alpha",
                     "--output_dir", str(tmp_path / "p"), *FAST], capsys)
    assert code == 2 and "runs of 2 data splits or methods" in err and "data_seed 13" in err


def test_a_legacy_run_folder_still_resolves(tiny_backbone_dir, task_dir, tmp_path, capsys):
    """Outputs of older versions (lr_*_bsz_*_seed_* and lr_*_bsz_* folders, no run column, no seed or method column)
    still load as a checkpoint."""
    out = tmp_path / "out"
    base = ["--tune_method", "lora", "--lora_r", "2", "--model", str(tiny_backbone_dir), "--task_dir", str(task_dir),
            "--tasks", "alpha", *FAST]
    assert run(["--do_train", "--do_predict", "--output_dir", str(out), *base], capsys)[0] == 0
    rows = read_rows(out / "result.tsv")
    run_folder = out / "alpha" / rows[0]["run"]
    for name, dropped in (("lr_0.001_bsz_4_seed_100", ("run",)), ("lr_0.001_bsz_4", ("run", "seed", "method"))):
        run_folder = run_folder.rename(out / "alpha" / name)
        legacy = [c for c in RESULT_COLUMNS if c not in dropped]
        (out / "result.tsv").write_text("\t".join(legacy) + "\n" + "".join(
            "\t".join(r[c] for c in legacy) + "\n" for r in rows))
        predicted = tmp_path / f"p_{len(dropped)}"
        code, err = run(["--do_predict", "--test_checkpoint", str(out / "alpha"), "--output_dir", str(predicted),
                         *base], capsys)
        assert code == 0, err
        assert read_rows(predicted / "result.tsv")[0]["test"] == rows[0]["test"]


def test_a_module_of_a_same_shaped_backbone_with_other_weights_is_refused(tiny_backbone_dir, task_dir, tmp_path,
                                                                           capsys):
    """A backbone of one shape but other weights (say flan-t5-base against t5-base-lm-adapt): refused with both
    names and hashes, accepted with --allow_other_backbone; a bf16 copy of the same weights is the same one."""
    from transformers import T5ForConditionalGeneration

    from models.delta import backbone_fingerprint

    other = tmp_path / "other_backbone"
    net = T5ForConditionalGeneration.from_pretrained(tiny_backbone_dir)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.01)
    net.save_pretrained(other, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_backbone_dir / name).is_file():
            shutil.copy(tiny_backbone_dir / name, other / name)
    mine = backbone_fingerprint(T5ForConditionalGeneration.from_pretrained(tiny_backbone_dir))
    assert backbone_fingerprint(T5ForConditionalGeneration.from_pretrained(tiny_backbone_dir).bfloat16()) == mine
    theirs = backbone_fingerprint(net)
    assert {k: v for k, v in theirs.items() if k != "weights"} == {k: v for k, v in mine.items() if k != "weights"}
    assert theirs["weights"] != mine["weights"]

    out = tmp_path / "out"
    base = ["--tune_method", "lora", "--lora_r", "2", "--task_dir", str(task_dir), "--tasks", "alpha", *FAST]
    assert run(["--do_train", "--model", str(tiny_backbone_dir), "--output_dir", str(out), *base], capsys)[0] == 0
    ckpt = only_run(out / "alpha") / "checkpoint"
    again = ["--do_train", "--train_checkpoint", str(ckpt), "--model", str(other), *base]
    code, err = run([*again, "--output_dir", str(tmp_path / "refused")], capsys)
    assert code == 2 and not (tmp_path / "refused").exists()
    assert (f"made for backbone '{tiny_backbone_dir.name}' (weights {mine['weights']})" in err
            and f"'other_backbone' has the same shape but other weights ({theirs['weights']})" in err
            and "--allow_other_backbone" in err)
    assert run([*again, "--output_dir", str(tmp_path / "allowed"), "--allow_other_backbone"], capsys)[0] == 0


# ---------------------------------------------------------------------------------------------- bad input
def bad_task_dir(tmp_path: Path, train: str) -> Path:
    root = tmp_path / "bad"
    make_task(root, "alpha", {"train": train, "dev": GOOD, "test": GOOD})
    return root


BAD_CASES = {
    "missing task_dir": (lambda tmp: ["--task_dir", str(tmp / "nope")], "nope"),
    "missing task": (lambda tmp: ["--tasks", "gamma"], "gamma"),
    "missing split": (lambda tmp: ["--k", "32"], "alpha_32_100_train.tsv"),
    "line without tab": (lambda tmp: ["--task_dir", str(bad_task_dir(tmp, "ok\tyes\nno tab here\n"))],
                         "alpha_16_100_train.tsv:2"),
    "empty input": (lambda tmp: ["--task_dir", str(bad_task_dir(tmp, "ok\tyes\n \tno\n"))],
                    "alpha_16_100_train.tsv:2"),
    "unknown method": (lambda tmp: ["--tune_method", "bitfit"], "bitfit"),
    "unknown task list": (lambda tmp: ["--tasks", "NO_SUCH_TASKS"], "NO_SUCH_TASKS"),
    "zero learning rate": (lambda tmp: ["--learning_rate_list", "0"], "--learning_rate_list"),
    "nan learning rate": (lambda tmp: ["--learning_rate_list", "nan"], "--learning_rate_list"),
    "zero batch size": (lambda tmp: ["--bsz_list", "0"], "--bsz_list"),
    "zero train_iters": (lambda tmp: ["--train_iters", "0"], "--train_iters"),
    "duplicate task": (lambda tmp: ["--tasks", "alpha", "alpha"], "alpha"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tiny_backbone_dir, task_dir, tmp_path, capsys):
    extra, needle = BAD_CASES[case]
    out = tmp_path / "out"
    argv = ["--do_train", "--do_predict", "--tune_method", "lora", "--lora_r", "2", "--model", str(tiny_backbone_dir),
            "--task_dir", str(task_dir), "--tasks", "alpha", "--output_dir", str(out), *FAST]
    argv += extra(tmp_path)
    code, err = run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not out.exists()


@pytest.mark.parametrize("mismatch", [["--tune_method", "lora", "--lora_r", "4"], ["--tune_method", "adapter"]])
def test_mismatched_checkpoint_is_refused(mismatch, tiny_backbone_dir, task_dir, tmp_path, capsys):
    src = tmp_path / "src"
    common = ["--model", str(tiny_backbone_dir), "--task_dir", str(task_dir), "--tasks", "alpha", *FAST]
    assert run(["--do_train", "--tune_method", "lora", "--lora_r", "2", "--output_dir", str(src), *common],
               capsys)[0] == 0
    out = tmp_path / "out"
    code, err = run(["--do_train", *mismatch, "--train_checkpoint", str(src / "alpha"), "--output_dir", str(out),
                     *common], capsys)
    assert code == 2 and "was made with method=lora" in err and err.count("\n") == 1
    assert not out.exists()


def test_checkpoint_from_another_backbone_is_refused(tiny_backbone_dir, task_dir, tmp_path, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    other = tmp_path / "other_backbone"
    shutil.copytree(tiny_backbone_dir, other)
    config = T5Config.from_pretrained(other)
    config.num_layers = config.num_decoder_layers = 1
    T5ForConditionalGeneration(config).save_pretrained(other, safe_serialization=True)
    common = ["--tune_method", "lora", "--lora_r", "2", "--task_dir", str(task_dir), "--tasks", "alpha", *FAST]
    src = tmp_path / "src"
    assert run(["--do_train", "--model", str(other), "--output_dir", str(src), *common], capsys)[0] == 0
    code, err = run(["--do_train", "--model", str(tiny_backbone_dir), "--train_checkpoint", str(src / "alpha"),
                     "--output_dir", str(tmp_path / "out"), *common], capsys)
    assert code == 2 and "backbone" in err


@pytest.mark.cli
def test_cli_subprocess_exit_code_and_help(tmp_path):
    """The real entry point: exit code 2 without a traceback, and --help works."""
    env_cmd = [sys.executable, str(REPO / "tune.py")]
    bad = subprocess.run([*env_cmd, "--do_train", "--task_dir", str(tmp_path / "missing")], capture_output=True,
                         text=True, cwd=REPO)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "missing" in bad.stderr
    helped = subprocess.run([*env_cmd, "--help"], capture_output=True, text=True, cwd=REPO)
    assert helped.returncode == 0 and "--learning_rate_list" in helped.stdout


def test_bundled_suite_trains_with_tiny_backbone(tiny_backbone_dir, tmp_path, capsys):
    """The bundled suite's real files go through the trainer (one task per family)."""
    out = tmp_path / "out"
    code, err = run(["--do_train", "--do_predict", "--tune_method", "adapter", "--adapter_size", "4",
                     "--model", str(tiny_backbone_dir), "--task_dir", str(SUITE_DIR), "--tasks", "SAMPLE_TASKS",
                     "--output_dir", str(out), *FAST], capsys)
    assert code == 0, err
    assert len(read_rows(out / "result.tsv")) == 5


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adapter", "lora", "prefix", "ia3"])
def test_the_causal_default_trains_and_predicts_each_method_on_the_bundled_suite(method, tmp_path, capsys):
    """models/default-causal through tune.py: a label task (generation of label words) and a free-text one."""
    out = tmp_path / "out"
    code, err = run(["--do_train", "--do_predict", "--tune_method", method, "--model", str(REPO / "models" /
                     "default-causal"), "--task_dir", str(SUITE_DIR), "--tasks", "sent_review", "ext_animals",
                     "--output_dir", str(out), "--lora_r", "4", "--adapter_size", "8", "--prefix_length", "8",
                     "--prefix_mlp", "32", *FAST], capsys)
    assert code == 0, err
    rows = read_rows(out / "result.tsv")
    assert [r["task"] for r in rows] == ["sent_review", "ext_animals"]
    for row in rows:
        assert 0.0 <= float(row["test"]) <= 1.0
        predictions = read_rows(out / row["task"] / row["run"] / "test_predictions.tsv")
        assert len(predictions) == 200 and any(p["prediction"] for p in predictions)
