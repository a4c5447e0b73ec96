"""A study's provenance: each step's marker records the hash of what its stage read, and a rerun redoes the steps
whose inputs have changed (kept apart from test_study.py so that the two run on separate test workers)."""

from __future__ import annotations

import shutil

import pytest

import study
from tests.conftest import SUITE_DIR, small_study_argv
from utils.errors import run_cli


@pytest.mark.slow
def test_a_split_edited_after_its_steps_ran_redoes_them(tiny_backbone_dir, tmp_path, capsys):
    """Each step's marker records the hash of what it read; a target's split edited after the study ran makes
    the rerun redo that data seed's target side (and say so), while the sources, whose inputs did not change,
    stay as they were."""
    data = tmp_path / "data"
    shutil.copytree(SUITE_DIR, data)
    out = tmp_path / "study"
    # the sources read split 13, the targets split 100: editing a target's split leaves the sources' inputs alone
    argv = [*small_study_argv(out, tiny_backbone_dir), "--task_dir", str(data), "--source_data_seed", "13"]
    assert run_cli(study.main, argv) == 0
    sources = {p: p.stat().st_mtime_ns for p in (out / "lora" / "sources").rglob("delta.safetensors")}
    random = out / "lora" / "seed_100" / "iters_2" / "random"
    trained = {p: p.stat().st_mtime_ns for p in random.glob("*/*/result.json")}
    assert len(trained) == 2
    capsys.readouterr()
    assert run_cli(study.main, argv) == 0  # nothing changed: nothing is redone
    printed = capsys.readouterr().out
    assert "has changed" not in printed and "lora/seed_100/iters_2/random: 2/2 done, 0 to run" in printed

    split = data / "sent_review" / "sent_review_16_100_train.tsv"
    lines = split.read_text(encoding="utf-8").splitlines()
    split.write_text("\n".join(lines[1:] + lines[:1]) + "\n", encoding="utf-8")  # the same examples, reordered
    assert run_cli(study.main, argv) == 0
    printed = capsys.readouterr().out
    assert "lora/sources: 4/4 done, 0 to run" in printed  # the sources read the large splits: unchanged
    assert "[2/8] lora/seed_100/iters_2/random: what 2 finished step(s) read has changed" in printed
    assert "lora/seed_100/iters_2/random: 0/2 done, 2 to run" in printed
    assert {p: p.stat().st_mtime_ns for p in sources} == sources
    # the random arm was trained again, on what the split now holds
    again = {p: p.stat().st_mtime_ns for p in random.glob("*/*/result.json")}
    assert len(again) == 2 and all(again.get(p) != t for p, t in trained.items())
