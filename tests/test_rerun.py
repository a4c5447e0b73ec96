"""Reruns: every entry point the bash wrappers call resumes with --resume (finished work kept as it is, work of
other settings refused) and replaces only with --overwrite; written files get the process's umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import tune
from get_similarity import dev_all, score
from models.run_folders import read_result_tsv
from tests.test_tune import FAST, GOOD, make_task
from utils.errors import run_cli


@pytest.fixture()
def task_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for task in ("alpha", "beta", "gamma"):
        make_task(root, task, {"train": GOOD, "dev": GOOD, "test": GOOD})
    return root


def tune_argv(model: Path, task_dir: Path, out: Path, tasks: list[str], *extra: str) -> list[str]:
    return ["--do_train", "--do_predict", "--tune_method", "lora", "--lora_r", "2", "--model", str(model),
            "--task_dir", str(task_dir), "--tasks", *tasks, "--output_dir", str(out), "--device", "cpu", *FAST, *extra]


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tune_resume_skips_finished_runs_and_trains_the_rest(tiny_backbone_dir, task_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(tune.main, tune_argv(tiny_backbone_dir, task_dir, out, ["alpha"], "--resume")) == 0
    first = snapshot(out / "alpha")
    capsys.readouterr()
    assert run_cli(tune.main, tune_argv(tiny_backbone_dir, task_dir, out, ["alpha", "beta"], "--resume")) == 0
    printed = capsys.readouterr().out
    assert "1 run(s) finished earlier with the same settings: skipped" in printed
    assert snapshot(out / "alpha") == first  # not rewritten, not even touched
    rows = (out / "result.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["alpha", "beta"]
    settings = json.loads(next((out / "beta").glob("lr_*/result.json")).read_text())["settings"]
    assert settings["task"] == "beta" and settings["seed"] == 42
    assert settings["delta"] == {"method": "lora", "lora_r": 2, "lora_alpha": 16}


def test_tune_resume_with_another_seed_is_another_run_beside_the_first(tiny_backbone_dir, task_dir, tmp_path, capsys):
    """Settings are part of a run's identity: a resumed sweep with another --seed trains its own run, in its own
    folder and row, and the first run stays as it was."""
    out = tmp_path / "out"
    assert run_cli(tune.main, tune_argv(tiny_backbone_dir, task_dir, out, ["alpha"], "--resume")) == 0
    first = snapshot(out / "alpha")
    assert run_cli(tune.main, tune_argv(tiny_backbone_dir, task_dir, out, ["alpha"], "--resume", "--seed", "7")) == 0
    assert {k: v for k, v in snapshot(out / "alpha").items() if k in first} == first
    rows = read_result_tsv(out / "result.tsv")
    assert [r["seed"] for r in rows] == ["42", "7"] and all(f"_seed_{r['seed']}_" in r["run"] for r in rows)
    assert sorted(p.name for p in (out / "alpha").iterdir()) == sorted(r["run"] for r in rows)
    assert all((out / "alpha" / r["run"] / "checkpoint").is_dir() for r in rows)


def test_tune_resume_refuses_a_folder_without_recorded_settings(tiny_backbone_dir, task_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(tune.main, tune_argv(tiny_backbone_dir, task_dir, out, ["alpha"])) == 0
    result = next((out / "alpha").glob("lr_*/result.json"))
    data = json.loads(result.read_text())
    del data["settings"]  # as an older version wrote it
    result.write_text(json.dumps(data))
    capsys.readouterr()
    code = run_cli(tune.main, tune_argv(tiny_backbone_dir, task_dir, out, ["alpha"], "--resume"))
    assert code == 2 and "without recorded settings" in capsys.readouterr().err


@pytest.fixture()
def sources(tiny_backbone_dir, task_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sources")
    assert run_cli(tune.main, tune_argv(tiny_backbone_dir, task_dir, out, ["alpha", "beta", "gamma"])) == 0
    return out


def test_similarity_resume_scores_only_missing_rows(tiny_backbone_dir, task_dir, sources, tmp_path, capsys):
    out = tmp_path / "sim"
    base = ["--delta", "lora", "--model", str(tiny_backbone_dir), "--task_dir", str(task_dir),
            "--source_ckpt_path", str(sources), "--output_dir", str(out), "--device", "cpu", "--quiet"]
    assert run_cli(score.main, [*base, "--metric", "Loss", "--tasks", "alpha", "beta",
                                "--source_tasks", "alpha", "beta", "gamma"]) == 0
    table = out / "result.tsv"
    first = table.read_text().splitlines()
    capsys.readouterr()
    # the same rows again, resumed: nothing to score, the file stays byte for byte
    assert run_cli(score.main, [*base, "--metric", "Loss", "--tasks", "alpha", "beta",
                                "--source_tasks", "alpha", "beta", "gamma", "--resume"]) == 0
    assert "nothing to score" in capsys.readouterr().out
    assert table.read_text().splitlines() == first
    # another metric added on resume: only its rows are new, the earlier ones are kept as they were
    assert run_cli(score.main, [*base, "--metric", "Loss", "EL2N", "--tasks", "alpha", "beta",
                                "--source_tasks", "alpha", "beta", "gamma", "--resume"]) == 0
    after = table.read_text().splitlines()
    assert after[:len(first)] == first
    assert sorted(line.split("\t")[2] for line in after[len(first):]) == ["EL2N"] * 4
    # without --resume the same rows are refused
    code = run_cli(score.main, [*base, "--metric", "Loss", "--tasks", "alpha", "--source_tasks", "beta"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err


def test_devall_resume_scores_only_missing_pairs(tiny_backbone_dir, task_dir, sources, tmp_path, capsys):
    table = tmp_path / "dev_all.tsv"
    base = ["--model", str(tiny_backbone_dir), "--task_dir", str(task_dir), "--source_ckpt_path", str(sources),
            "--output", str(table), "--device", "cpu", "--quiet", "--max_output_length", "4"]
    assert run_cli(dev_all.main, [*base, "--tasks", "alpha", "--source_tasks", "alpha", "beta", "gamma"]) == 0
    first = table.read_text().splitlines()
    capsys.readouterr()
    assert run_cli(dev_all.main, [*base, "--tasks", "alpha", "beta", "--source_tasks", "alpha", "beta", "gamma",
                                  "--resume"]) == 0
    rows = [line.split("\t") for line in table.read_text().splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [("alpha", "beta"), ("alpha", "gamma"), ("beta", "alpha"), ("beta", "gamma")]
    assert table.read_text().splitlines()[:len(first)] == first
    capsys.readouterr()
    assert run_cli(dev_all.main, [*base, "--tasks", "alpha", "beta", "--source_tasks", "alpha", "beta", "gamma",
                                  "--resume"]) == 0
    assert "nothing to score" in capsys.readouterr().out


def test_written_files_follow_the_umask(tiny_backbone_dir, task_dir, tmp_path, capsys):
    old = os.umask(0o002)  # a group-shared machine: files readable and writable by the group
    try:
        out = tmp_path / "out"
        assert run_cli(tune.main, tune_argv(tiny_backbone_dir, task_dir, out, ["alpha"])) == 0
    finally:
        os.umask(old)
    weights = next(out.glob("alpha/lr_*/checkpoint/delta.safetensors"))
    for path in (weights, out / "result.tsv", weights.parent / "delta_config.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path


def test_a_nan_dev_score_is_never_the_best_run(tiny_backbone_dir, task_dir, tmp_path, capsys):
    from models.run_folders import resolve_checkpoint
    from utils.errors import UserInputError

    out = tmp_path / "out"
    argv = tune_argv(tiny_backbone_dir, task_dir, out, ["alpha"], "--learning_rate_list", "1e-3", "2e-3")
    assert run_cli(tune.main, argv) == 0
    table = out / "result.tsv"
    lines = table.read_text().splitlines()
    header = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[1:]]
    rows[0][header.index("dev")] = "nan"  # the first run: max() would keep it, NaN comparing False to everything
    rows[1][header.index("dev")] = "0.25"
    table.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    assert resolve_checkpoint(out / "alpha").parent.name == rows[1][header.index("run")]  # lr 0.002
    rows[1][header.index("dev")] = "inf"
    table.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    with pytest.raises(UserInputError, match="no run of task 'alpha' has a finite dev score"):
        resolve_checkpoint(out / "alpha")
