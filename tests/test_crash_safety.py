"""SIGKILL in the middle of writing a checkpoint: nothing half-written under a final name, and a rerun
completes with the same files as a run that was never interrupted.

The kill is made deterministic: the child process runs the real script with ``os.rename``/``os.replace``
wrapped so that the rename of a chosen temporary path (a checkpoint folder that is fully written but not
yet renamed into place) blocks after touching a marker file; the test waits for the marker, then kills.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import study
import tune
from models.formats import load_delta_checkpoint
from tests.conftest import REPO, only_run, small_study_argv
from utils.errors import run_cli

# Runs a script as __main__ after wrapping the renames: the (SKIP+1)-th rename whose source path matches
# the glob BLOCK_RENAME writes that path to BLOCK_MARKER and waits to be killed.
CHILD = r"""
import fnmatch, os, runpy, sys, time
pattern, marker, skip = os.environ["BLOCK_RENAME"], os.environ["BLOCK_MARKER"], int(os.environ["BLOCK_SKIP"])
seen = [0]

def blocking(real):
    def rename(src, dst, *args, **kwargs):
        if fnmatch.fnmatch(os.fspath(src), pattern):
            seen[0] += 1
            if seen[0] > skip:
                with open(marker + ".part", "w") as f:
                    f.write(os.fspath(src))
                real(marker + ".part", marker)
                time.sleep(3600)
        return real(src, dst, *args, **kwargs)
    return rename

os.rename, os.replace = blocking(os.rename), blocking(os.replace)
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
"""


def kill_while_renaming(script: Path, argv: list[str], pattern: str, marker: Path, skip: int = 0,
                        timeout: float = 240) -> Path:
    """Run ``script argv`` until it is about to rename a path matching ``pattern``; SIGKILL it; return that path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "BLOCK_RENAME": pattern, "BLOCK_MARKER": str(marker), "BLOCK_SKIP": str(skip)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(script), *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the child ended (code {proc.returncode}) before the blocked rename:\n"
                                     f"{proc.stderr.read()[-3000:]}")
            if time.time() > deadline:
                raise AssertionError("the child never reached the blocked rename")
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return Path(marker.read_text())


def visible(root: Path) -> list[Path]:
    """Paths under ``root`` with no hidden component: what readers (and reruns) take for outputs."""
    return sorted(p for p in root.rglob("*") if not any(part.startswith(".") for part in p.relative_to(root).parts))


GOOD = "the cat sat\tyes\nthe dog ran\tno\na red fox\tyes\nblue sky\tno\tnope\n"


def test_tune_killed_while_saving_its_checkpoint(tiny_backbone_dir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    (data / "alpha").mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (data / "alpha" / f"alpha_16_100_{split}.tsv").write_text(GOOD, encoding="utf-8")

    def argv(out: Path) -> list[str]:
        return ["--do_train", "--do_predict", "--tune_method", "lora", "--lora_r", "2", "--model",
                str(tiny_backbone_dir), "--task_dir", str(data), "--tasks", "alpha", "--output_dir", str(out),
                "--train_iters", "3", "--valid_interval", "1", "--warmup_steps", "1", "--learning_rate_list",
                "1e-2", "--bsz_list", "2", "--max_output_length", "4", "--quiet", "--device", "cpu"]

    out = tmp_path / "killed"
    blocked = kill_while_renaming(REPO / "tune.py", argv(out), "*/.checkpoint.tmp-*", tmp_path / "marker")
    # It was killed with the checkpoint complete in its temporary folder, before the rename.
    assert blocked.parent.parent == out / "alpha" and blocked.parent.name.startswith(".lr_0.01_bsz_2_k_")
    assert sorted(p.name for p in blocked.iterdir()) == ["delta.safetensors", "delta_config.json"]
    # Nothing is visible under a final name: no run folder, no result.tsv, only the (empty) task folder.
    assert visible(out) == [out / "alpha"]

    assert run_cli(tune.main, argv(out)) == 0, capsys.readouterr().err  # the rerun is not refused
    reference = tmp_path / "reference"
    assert run_cli(tune.main, argv(reference)) == 0
    run = only_run(reference / "alpha").relative_to(reference)
    names = ["result.tsv", run / "curve.tsv", run / "result.json", run / "test_predictions.tsv",
             run / "checkpoint" / "delta.safetensors", run / "checkpoint" / "delta_config.json"]
    for name in names:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert [p.relative_to(out) for p in visible(out)] == [p.relative_to(reference) for p in visible(reference)]


@pytest.mark.slow
def test_study_killed_in_the_tuneall_stage(tiny_backbone_dir: Path, reference_study: Path, tmp_path: Path,
                                           capsys) -> None:
    """SIGKILL while tune-all saves its second module of the first target; the rerun resumes from there."""
    out = tmp_path / "killed"
    tuneall = out / "lora" / "seed_100" / "tuneall"
    blocked = kill_while_renaming(REPO / "study.py", small_study_argv(out, tiny_backbone_dir),
                                  f"{tuneall}/*/.*.tmp-*", tmp_path / "marker", skip=1)
    target = blocked.parent.name
    assert target == "sent_review" and sorted(p.name for p in blocked.iterdir()) == ["delta.safetensors",
                                                                                       "delta_config.json"]
    # The first pair's module is whole; the second is not visible; the stage is not marked done. (tune_all.log
    # is a log appended line by line, not an output.)
    done = [p for p in visible(tuneall) if p.name != "tune_all.log"]
    assert done == [tuneall / target, tuneall / target / "sent_tweet",
                    tuneall / target / "sent_tweet" / "delta.safetensors",
                    tuneall / target / "sent_tweet" / "delta_config.json"]
    tensors, meta = load_delta_checkpoint(tuneall / target / "sent_tweet")
    assert tensors and meta["extra"]["source"] == "sent_tweet"
    steps = sorted(p.name for p in (out / ".steps").iterdir() if not p.name.startswith("."))
    assert steps and not [s for s in steps if "tuneall" in s]
    before = (tuneall / target / "sent_tweet" / "delta.safetensors").stat().st_mtime_ns

    capsys.readouterr()
    assert run_cli(study.main, small_study_argv(out, tiny_backbone_dir)) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "lora/sources: 4/4 done, 0 to run" in printed and "lora/seed_100/tuneall: 0/2 done, 2 to run" in printed
    assert (tuneall / target / "sent_tweet" / "delta.safetensors").stat().st_mtime_ns == before  # resumed, kept

    reference = reference_study
    split = Path("lora") / "seed_100"
    names = [Path("results") / "summary.tsv", Path("results") / "transfer_pairs.tsv", split / "devall.tsv",
             split / "similarity" / "result.tsv", split / "pairs.tsv"]
    names += [p.relative_to(reference) for p in visible(reference / split / "tuneall") if p.name.startswith("delta")]
    names += [p.relative_to(reference) for p in visible(reference / split / "fused") if p.suffix == ".safetensors"]
    assert len(names) > 5 + 2 * 3 * 2
    for name in names:
        ours = (out / name).read_bytes().replace(str(out).encode(), b"STUDY")  # metadata records source paths
        assert ours == (reference / name).read_bytes().replace(str(reference).encode(), b"STUDY"), name


def test_study_killed_in_a_grouped_tune_stage(tiny_backbone_dir: Path, reference_study: Path, tmp_path: Path,
                                              capsys) -> None:
    """SIGKILL while the sources stage, its four tasks in one group, commits its second run folder; the rerun
    trains the group again and ends with the uninterrupted study's outputs."""
    out = tmp_path / "killed"
    sources = out / "lora" / "sources"
    # a run folder's own temporary name (the small study's source run, its 8-digit hash, 12 characters after .tmp-,
    # no slash): not the files inside it
    pattern = f"{sources}/*/.lr_0.003_bsz_16_k_16_data_100_seed_42_" + "[!/]" * 8 + ".tmp-" + "[!/]" * 12
    blocked = kill_while_renaming(REPO / "study.py", small_study_argv(out, tiny_backbone_dir), pattern,
                                  tmp_path / "marker", skip=1)
    assert blocked.parent.name == "sent_tweet"
    assert [p.parent.name for p in sources.glob("*/lr_*")] == ["sent_review"]  # the first one committed
    assert not (out / ".steps").exists() or not [p for p in (out / ".steps").iterdir() if "sources" in p.name]

    capsys.readouterr()
    assert run_cli(study.main, small_study_argv(out, tiny_backbone_dir)) == 0, capsys.readouterr().err
    assert "lora/sources: 0/4 done, 4 to run" in capsys.readouterr().out
    split = Path("lora") / "seed_100"
    names = [Path("results") / "summary.tsv", Path("lora") / "sources" / "result.tsv", split / "pairs.tsv"]
    names += [p.relative_to(reference_study) for p in visible(reference_study / "lora" / "sources")
              if p.suffix == ".safetensors"]
    assert len(names) == 3 + 4
    for name in names:
        ours = (out / name).read_bytes().replace(str(out).encode(), b"STUDY")
        assert ours == (reference_study / name).read_bytes().replace(str(reference_study).encode(), b"STUDY"), name
