"""tune_all.py and dev_all.py end to end on a tiny random backbone, tiny tasks and tiny source modules."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tune
from dataloader.crossfit import load_task
from get_similarity import dev_all, tune_all
from models.backbone import load_backbone
from models.delta import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    DeltaConfig,
    attach_delta,
    backbone_fingerprint,
    check_compatible,
    delta_state_dict,
    load_delta_state,
    save_delta_checkpoint,
)
from models.evaluate import evaluate
from models.examples import encode_examples
from models.formats import load_delta_checkpoint
from tests.conftest import REPO, only_run
from utils.errors import run_cli

TASKS = ["alpha", "beta", "gamma"]
LORA = DeltaConfig("lora", lora_r=2, lora_alpha=4)
# Short everything: 2 steps, 2 examples a batch, 4 generated tokens.
FAST = ["--steps", "2", "--learning_rate", "1e-2", "--bsz", "2", "--warmup_steps", "1", "--max_output_length", "4",
        "--quiet"]
TRAIN = "the cat sat\tyes\nthe dog ran\tno\na red fox\tyes\nblue sky\tno\tnope\n"
DEV = "a cat ran\tyes\nthe red sky\tno\nblue dog\tno\n"


@pytest.fixture()
def task_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for task in TASKS:
        (root / task).mkdir(parents=True)
        for split, text in {"train": TRAIN, "dev": DEV}.items():
            (root / task / f"{task}_16_100_{split}.tsv").write_text(text, encoding="utf-8")
    return root


def make_sources(root: Path, backbone: Path, cfg: DeltaConfig, tasks: list[str]) -> Path:
    """One source module per task: the delta's initial weights plus seeded noise (LoRA's B is not zero then)."""
    model, _ = load_backbone(backbone)
    attach_delta(model, cfg)
    base = delta_state_dict(model)
    for i, task in enumerate(tasks):
        gen = torch.Generator().manual_seed(i)
        tensors = {n: v + 0.1 * torch.randn(v.shape, generator=gen) for n, v in base.items()}
        save_delta_checkpoint(root / task, tensors, cfg, backbone.name, backbone_fingerprint(model), task=task)
    return root


@pytest.fixture()
def sources(tmp_path: Path, tiny_backbone_dir: Path) -> Path:
    return make_sources(tmp_path / "sources", tiny_backbone_dir, LORA, TASKS)


def tune_args(backbone: Path, task_dir: Path, sources: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(backbone), "--task_dir", str(task_dir), "--tasks", *TASKS, "--source_ckpt_path",
            str(sources), "--output_dir", str(out), *FAST, *extra]


def dev_args(backbone: Path, task_dir: Path, sources: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(backbone), "--task_dir", str(task_dir), "--tasks", *TASKS, "--source_ckpt_path",
            str(sources), "--output", str(out), "--max_output_length", "4", "--quiet", *extra]


def run(main, argv: list[str], capsys) -> tuple[int, str]:
    code = run_cli(main, argv)
    return code, capsys.readouterr().err


def tuned_pairs(out: Path) -> set[tuple[str, str]]:
    return {(p.parent.name, p.name) for p in out.glob("*/*") if (p / CONFIG_FILE).is_file()}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_tune_all_tunes_every_pair_but_self(tiny_backbone_dir, task_dir, sources, tmp_path, capsys):
    out = tmp_path / "tuneall"
    code, err = run(tune_all.main, tune_args(tiny_backbone_dir, task_dir, sources, out), capsys)
    assert code == 0, err
    assert tuned_pairs(out) == {(t, s) for t in TASKS for s in TASKS if s != t}  # 3 x 2, never (t, t)
    assert not [p for p in out.rglob(".*")]  # no temporary folders left behind

    model, _ = load_backbone(tiny_backbone_dir)
    attach_delta(model, LORA)
    for t, s in tuned_pairs(out):
        tensors, meta = load_delta_checkpoint(out / t / s)
        check_compatible(meta, LORA, backbone_fingerprint(model), "tuned")
        load_delta_state(model, tensors, "tuned")  # loads back into a fresh model
        assert meta["task"] == t and meta["metric"] == "ACC" and meta["step"] == 2
        extra = meta["extra"]
        assert extra["source"] == s and extra["steps"] == 2 and extra["lr"] == 1e-2 and extra["bsz"] == 2
        assert extra["dev"] == meta["score"] and 0.0 <= meta["score"] <= 1.0
        source_tensors, _ = load_delta_checkpoint(sources / s)
        assert tensors.keys() == source_tensors.keys()
        moved = [n for n in tensors if not torch.equal(tensors[n], source_tensors[n])]
        assert len(moved) == len(tensors)  # every delta parameter moved away from its source


def test_rerun_skips_existing_pairs_and_overwrite_redoes_them(tiny_backbone_dir, task_dir, sources, tmp_path,
                                                              capsys):
    out = tmp_path / "tuneall"
    argv = tune_args(tiny_backbone_dir, task_dir, sources, out, "--tasks", "alpha", "beta", "--source_tasks", *TASKS)
    assert run(tune_all.main, argv, capsys)[0] == 0

    def stamps() -> dict[tuple[str, str], int]:
        return {pair: (out / pair[0] / pair[1] / WEIGHTS_FILE).stat().st_mtime_ns for pair in tuned_pairs(out)}

    first = stamps()
    assert set(first) == {("alpha", "beta"), ("alpha", "gamma"), ("beta", "alpha"), ("beta", "gamma")}
    assert run(tune_all.main, argv, capsys)[0] == 0
    assert stamps() == first  # nothing retrained

    # A pair lost (or never finished) is the only one redone.
    weights_before, _ = load_delta_checkpoint(out / "alpha" / "gamma")
    for f in (out / "alpha" / "gamma").iterdir():
        f.unlink()
    (out / "alpha" / "gamma").rmdir()
    assert run(tune_all.main, argv, capsys)[0] == 0
    again = stamps()
    assert {p for p in first if again[p] != first[p]} == {("alpha", "gamma")}
    weights_after, _ = load_delta_checkpoint(out / "alpha" / "gamma")
    assert all(torch.equal(weights_before[n], weights_after[n]) for n in weights_before)  # deterministic

    assert run(tune_all.main, [*argv, "--overwrite"], capsys)[0] == 0
    redone = stamps()
    assert all(redone[p] != again[p] for p in first)

    # A different set-up refuses to mix with the modules already there.
    code, err = run(tune_all.main, [*argv, "--steps", "3"], capsys)
    assert code == 2 and "steps=2" in err and "steps=3" in err and "--overwrite" in err
    assert stamps() == redone


@pytest.mark.parametrize("method", ["adapter", "lora", "prefix", "ia3"])
def test_tune_all_equals_tune_py_from_the_source(method, tiny_backbone_dir, task_dir, tmp_path, capsys):
    cfg = DeltaConfig(method, adapter_size=4, lora_r=2, lora_alpha=4, prefix_length=3, prefix_mlp=8)
    srcs = make_sources(tmp_path / "sources", tiny_backbone_dir, cfg, ["alpha", "beta"])
    out = tmp_path / "tuneall"
    argv = tune_args(tiny_backbone_dir, task_dir, srcs, out, "--tasks", "alpha", "--source_tasks", "beta",
                     "--steps", "3")
    assert run(tune_all.main, argv, capsys)[0] == 0
    ours, meta = load_delta_checkpoint(out / "alpha" / "beta")

    runs = tmp_path / "tune_py"
    code, err = run(tune.main, ["--do_train", "--tune_method", method, "--adapter_size", "4", "--lora_r", "2",
                                "--lora_alpha", "4", "--prefix_length", "3", "--prefix_mlp", "8",
                                "--model", str(tiny_backbone_dir), "--task_dir", str(task_dir), "--tasks", "alpha",
                                "--output_dir", str(runs), "--train_checkpoint", str(srcs / "beta"),
                                "--train_iters", "3", "--valid_interval", "3", "--early_stop", "0", "--save_last",
                                "--learning_rate_list", "1e-2", "--bsz_list", "2", "--warmup_steps", "1",
                                "--max_output_length", "4", "--quiet"], capsys)
    assert code == 0, err
    theirs, their_meta = load_delta_checkpoint(only_run(runs / "alpha") / "checkpoint")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert meta["score"] == their_meta["score"] and their_meta["step"] == 3


def test_dev_all_scores_sources_and_tuned_modules(tiny_backbone_dir, task_dir, sources, tmp_path, capsys):
    out = tmp_path / "tuneall"
    assert run(tune_all.main, tune_args(tiny_backbone_dir, task_dir, sources, out, "--source_tasks", "alpha",
                                        "beta"), capsys)[0] == 0
    assert tuned_pairs(out) == {("alpha", "beta"), ("beta", "alpha"), ("gamma", "alpha"), ("gamma", "beta")}
    table = tmp_path / "res" / "dev_all.tsv"
    code, err = run(dev_all.main, dev_args(tiny_backbone_dir, task_dir, sources, table, "--tuneall_ckpt_path",
                                           str(out)), capsys)
    assert code == 0, err
    with open(table, encoding="utf-8") as f:
        assert f.readline() == "target\tsource\tdev_zero_shot\tdev_after\n"
    rows = read_rows(table)
    assert [(r["target"], r["source"]) for r in rows] == [(t, s) for t in TASKS for s in TASKS if s != t]

    # The same scores computed directly, module by module.
    model, tokenizer = load_backbone(tiny_backbone_dir)
    attach_delta(model, LORA)

    def direct(folder: Path, task: str) -> float:
        tensors, _ = load_delta_checkpoint(folder)
        load_delta_state(model, tensors, str(folder))
        dev = encode_examples(tokenizer, load_task(task_dir, task, 16, 100, ["dev"])["dev"], 256, 4)
        return evaluate(model, tokenizer, dev, "ACC", 64, 4)[0]

    for r in rows:
        t, s = r["target"], r["source"]
        assert float(r["dev_zero_shot"]) == direct(sources / s, t)
        if (t, s) in tuned_pairs(out):
            assert float(r["dev_after"]) == direct(out / t / s, t)
            assert float(r["dev_after"]) == load_delta_checkpoint(out / t / s)[1]["score"]  # what tune_all saw
        else:
            assert r["dev_after"] == "-"
    assert {(r["target"], r["source"]) for r in rows if r["dev_after"] == "-"} == {
        ("alpha", "gamma"), ("beta", "gamma")}

    # Without tuned modules every dev_after is "-", and the zero-shot column does not change.
    again = tmp_path / "res" / "zero_shot.tsv"
    assert run(dev_all.main, dev_args(tiny_backbone_dir, task_dir, sources, again), capsys)[0] == 0
    rows_zero = read_rows(again)
    assert [r["dev_after"] for r in rows_zero] == ["-"] * 6
    assert [r["dev_zero_shot"] for r in rows_zero] == [r["dev_zero_shot"] for r in rows]


def _lora_r3_beta(tmp_path: Path, backbone: Path, sources: Path) -> None:
    make_sources(tmp_path / "other", backbone, DeltaConfig("lora", lora_r=3, lora_alpha=4), ["beta"])
    for f in (sources / "beta").iterdir():
        f.unlink()
    for f in (tmp_path / "other" / "beta").iterdir():
        f.rename(sources / "beta" / f.name)


def _missing_gamma(tmp_path: Path, backbone: Path, sources: Path) -> None:
    for f in (sources / "gamma").iterdir():
        f.unlink()
    (sources / "gamma").rmdir()


BAD = {
    "missing source": (_missing_gamma, [], "gamma: checkpoint not found"),
    "mismatched sizes": (_lora_r3_beta, [], "lora_r=3"),
    "unknown task": (None, ["--tasks", "alpha", "delta"], "unknown task or task list 'delta'"),
    "self only": (None, ["--tasks", "alpha", "--source_tasks", "alpha"], "no (target, source) pair"),
    "other method": (None, ["--tune_method", "prefix"], "--tune_method prefix"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_and_writes_nothing(case, tiny_backbone_dir, task_dir, sources, tmp_path, capsys):
    prepare, extra, message = BAD[case]
    if prepare is not None:
        prepare(tmp_path, tiny_backbone_dir, sources)
    out, table = tmp_path / "tuneall", tmp_path / "dev_all.tsv"
    for main, argv in ((tune_all.main, tune_args(tiny_backbone_dir, task_dir, sources, out, *extra)),
                       (dev_all.main, dev_args(tiny_backbone_dir, task_dir, sources, table, *extra))):
        code, err = run(main, argv, capsys)
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists() and not table.exists()


@pytest.mark.parametrize(("flags", "message"), [(["--steps", "0"], "--steps: expected a positive integer"),
                                                (["--bsz", "-1"], "--bsz: expected a positive integer"),
                                                (["--learning_rate", "nan"], "--learning_rate"),
                                                (["--warmup_steps", "-1"], "--warmup_steps: expected zero or")])
def test_bad_flags_exit_2_and_write_nothing(flags, message, tiny_backbone_dir, task_dir, sources, tmp_path, capsys):
    out = tmp_path / "tuneall"
    code, err = run(tune_all.main, tune_args(tiny_backbone_dir, task_dir, sources, out, *flags), capsys)
    assert code == 2 and message in err
    assert not out.exists()


def test_tuned_folder_that_is_not_a_module_is_refused(tiny_backbone_dir, task_dir, sources, tmp_path, capsys):
    out = tmp_path / "tuneall"
    (out / "alpha" / "beta").mkdir(parents=True)
    (out / "alpha" / "beta" / "notes.txt").write_text("mine")
    code, err = run(tune_all.main, tune_args(tiny_backbone_dir, task_dir, sources, out, "--overwrite"), capsys)
    assert code == 2 and "alpha/beta: exists but is not a delta checkpoint" in err
    assert sorted(p.name for p in out.rglob("*")) == ["alpha", "beta", "notes.txt"]


@pytest.mark.cli
@pytest.mark.parametrize(("cmd", "cwd"), [(["get_similarity/tune_all.py"], "/"),
                                         (["-m", "get_similarity.dev_all"], REPO)])
def test_cli_help_runs_as_file_and_as_module(cmd, cwd):
    if cmd[0].endswith(".py"):
        cmd = [str(REPO / cmd[0])]
    proc = subprocess.run([sys.executable, *cmd, "--help"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and "--source_ckpt_path" in proc.stdout


def dry_run(script: str, **env: str) -> list[str]:
    """The command a script would run (DRY_RUN=1), split into words."""
    clean = {k: v for k, v in os.environ.items() if k not in {"DELTA", "LR", "TASKS", "OUTPUT_DIR", "STEPS"}}
    proc = subprocess.run(["bash", str(REPO / "scripts" / script)], env={**clean, "DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def flag(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def test_scripts_set_the_method_and_take_overrides(tmp_path):
    words = dry_run("prefix_tuneall.sh", TASKS="alpha beta", STEPS="7")
    assert words[1:3] == ["-m", "get_similarity.tune_all"]
    assert flag(words, "--tune_method") == "prefix" and flag(words, "--learning_rate") == "3e-3"
    assert flag(words, "--source_ckpt_path") == "runs/sources/prefix"
    assert flag(words, "--output_dir") == "runs/tuneall/prefix" and flag(words, "--steps") == "7"
    assert words[words.index("--tasks") + 1:words.index("--source_tasks")] == ["alpha", "beta"]
    assert flag(dry_run("adapter_tuneall.sh", LR="1e-4"), "--learning_rate") == "1e-4"

    # dev-all reads the tuned modules only where tune-all wrote some.
    words = dry_run("lora_devall.sh", OUTPUT_DIR=str(tmp_path / "none"))
    assert flag(words, "--tune_method") == "lora" and "--tuneall_ckpt_path" not in words
    assert flag(words, "--output") == str(tmp_path / "none" / "dev_all.tsv")
    words = dry_run("lora_devall.sh", OUTPUT_DIR=str(tmp_path))
    assert flag(words, "--tuneall_ckpt_path") == str(tmp_path)
