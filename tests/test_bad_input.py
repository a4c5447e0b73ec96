"""The bad-input matrix: every entry point refuses bad input the same way.

Each case runs one command (tune.py, the similarity / tune-all / dev-all / importance CLIs, the fusion
scripts, study.py) on input with one thing wrong and checks that it exits with code 2, prints exactly one
line (``error: ...``) naming the file or flag (and the line number where there is one), prints nothing to
stdout, shows no traceback, and leaves every file and folder under the case's folder and the shared
inputs exactly as they were (paths, mtimes and hashes). Most cases call ``main(argv)`` in-process (fast);
a few run the real script in a subprocess for the real exit code, and one checks that ``--debug`` shows
the traceback instead.

An output that already holds results is refused per output (the exact run folder, predict folder,
result rows, table, fused checkpoint or plot the command would write), so parallel jobs of one sweep can
share a folder; tune_all.py and study.py resume by design instead, and refuse only what does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import study
import tune
from get_similarity import dev_all, importance, score, tune_all
from models.backbone import load_backbone
from models.delta import DeltaConfig, attach_delta, backbone_fingerprint, delta_state_dict, save_delta_checkpoint
from tests.conftest import REPO, SUITE_DIR, only_run
from unit_model import unit_model_average, unit_model_cos, unit_model_others
from utils.errors import run_cli

TASKS = ("alpha", "beta", "gamma")
GOOD = "the cat sat\tyes\nthe dog ran\tno\na red fox\tyes\nblue sky\tno\tnope\n"
LORA = DeltaConfig("lora", lora_r=2, lora_alpha=4)
TUNE_FAST = ["--train_iters", "2", "--valid_interval", "1", "--log_interval", "1", "--warmup_steps", "1",
             "--learning_rate_list", "1e-3", "--bsz_list", "4", "--max_output_length", "4", "--quiet"]


@dataclass
class World:
    """Shared, read-only inputs: a task folder, modules on the tiny backbone, score tables."""

    root: Path
    backbone: Path
    data: Path  # alpha, beta, gamma: k=16, seed 100, train/dev/test
    src: Path  # src/{task}: a LoRA r=2 checkpoint per task
    random: Path  # random/{task}: the "tuned from random init" modules (cos, KL)
    sim: Path  # a similarity result.tsv with Loss rows for every pair
    adapter: Path  # an adapter checkpoint (another method)
    lora_r4: Path  # a LoRA r=4 checkpoint (other sizes)
    other_backbone: Path  # a LoRA r=2 checkpoint made on a 1-layer backbone


def _save_modules(backbone: Path, cfg: DeltaConfig, folders: dict[Path, str | None], seed: int) -> None:
    """A checkpoint per folder (its task as given), with every delta tensor moved off its initial value."""
    model, _ = load_backbone(backbone)
    torch.manual_seed(42)
    attach_delta(model, cfg)
    base = delta_state_dict(model)
    for i, (folder, task) in enumerate(folders.items()):
        gen = torch.Generator().manual_seed(seed + i)
        tensors = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        save_delta_checkpoint(folder, tensors, cfg, backbone.name, backbone_fingerprint(model), task=task)


def _write_tasks(root: Path, tasks: tuple[str, ...] = TASKS, k: int = 16) -> None:
    for task in tasks:
        (root / task).mkdir(parents=True, exist_ok=True)
        for split in ("train", "dev", "test"):
            (root / task / f"{task}_{k}_100_{split}.tsv").write_text(GOOD, encoding="utf-8")


@pytest.fixture(scope="module")
def world(tiny_backbone_dir: Path, tmp_path_factory) -> World:
    from transformers import T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("world")
    _write_tasks(root / "data")
    _save_modules(tiny_backbone_dir, LORA, {root / "src" / t: t for t in TASKS}, seed=1)
    _save_modules(tiny_backbone_dir, LORA, {root / "random" / t: t for t in TASKS}, seed=10)
    _save_modules(tiny_backbone_dir, DeltaConfig("adapter", adapter_size=4), {root / "adapter": None}, seed=20)
    _save_modules(tiny_backbone_dir, DeltaConfig("lora", lora_r=4, lora_alpha=4), {root / "lora_r4": None}, 30)
    other = root / "other_backbone_model"
    shutil.copytree(tiny_backbone_dir, other)
    config = T5Config.from_pretrained(other)
    config.num_layers = config.num_decoder_layers = 1
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(other, safe_serialization=True)
    _save_modules(other, LORA, {root / "other_backbone": None}, seed=40)
    sim = root / "sim.tsv"
    rows = [f"{t}\t{s}\tLoss\tmodel\t{1.0 + i / 10}" for i, (t, s) in
            enumerate((t, s) for t in TASKS for s in TASKS if s != t)]
    sim.write_text("target\tsource\tmetric\tgroup\tscore\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return World(root, tiny_backbone_dir, root / "data", root / "src", root / "random", sim, root / "adapter",
                 root / "lora_r4", root / "other_backbone")


# --------------------------------------------------------------------------------------------------
# Building bad inputs inside a case's own folder


def copy_data(w: World, tmp: Path) -> Path:
    shutil.copytree(w.data, tmp / "data")
    return tmp / "data"


def split_file(data: Path, task: str, split: str, k: int = 16) -> Path:
    return data / task / f"{task}_{k}_100_{split}.tsv"


def bad_split(w: World, tmp: Path, content: bytes, task: str = "alpha", split: str = "train") -> tuple[Path, Path]:
    """A copy of the task folder with one split replaced by ``content``; returns (data, that file)."""
    data = copy_data(w, tmp)
    path = split_file(data, task, split)
    path.write_bytes(content)
    return data, path


def copy_sources(w: World, tmp: Path) -> Path:
    shutil.copytree(w.src, tmp / "src")
    return tmp / "src"


def truncate(folder: Path) -> Path:
    """Cut a checkpoint's delta.safetensors in half (a copy interrupted mid-way); returns the file."""
    weights = folder / "delta.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return weights


def truncated_copy(w: World, tmp: Path, task: str = "alpha") -> tuple[Path, Path]:
    """(sources folder, truncated weights file) with ``task``'s checkpoint truncated."""
    src = copy_sources(w, tmp)
    return src, truncate(src / task)


def replace_source(w: World, tmp: Path, task: str, by: Path) -> Path:
    src = copy_sources(w, tmp)
    shutil.rmtree(src / task)
    shutil.copytree(by, src / task)
    return src


def sim_with(w: World, tmp: Path, old: str, new: str) -> tuple[Path, int]:
    """A copy of the similarity table with one score replaced; returns (file, its line number)."""
    lines = w.sim.read_text(encoding="utf-8").splitlines()
    i = next(i for i, line in enumerate(lines) if line.endswith(f"\t{old}"))
    lines[i] = lines[i][: -len(old)] + new
    path = tmp / "sim.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, i + 1


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Command lines


def tune_argv(w: World, tmp: Path, *extra: str, data: Path | None = None, tasks: tuple[str, ...] = ("alpha",)
              ) -> list[str]:
    return ["--do_train", "--do_predict", "--tune_method", "lora", "--lora_r", "2", "--lora_alpha", "4",
            "--model", str(w.backbone), "--task_dir", str(data or w.data), "--tasks", *tasks,
            "--output_dir", str(tmp / "out"), *TUNE_FAST, *extra]


def score_argv(w: World, tmp: Path, *extra: str, src: Path | None = None) -> list[str]:
    return ["--delta", "lora", "--metric", "Loss", "--tasks", "alpha", "beta", "--source_ckpt_path",
            str(src or w.src), "--model", str(w.backbone), "--task_dir", str(w.data), "--max_examples", "2",
            "--output_dir", str(tmp / "out"), "--device", "cpu", "--quiet", *extra]


def tuneall_argv(w: World, tmp: Path, *extra: str) -> list[str]:
    return ["--tasks", "alpha", "beta", "--source_ckpt_path", str(w.src), "--output_dir", str(tmp / "out"),
            "--model", str(w.backbone), "--task_dir", str(w.data), "--steps", "1", "--bsz", "2",
            "--max_output_length", "4", "--device", "cpu", "--quiet", *extra]


def devall_argv(w: World, tmp: Path, *extra: str) -> list[str]:
    return ["--tasks", "alpha", "beta", "--source_ckpt_path", str(w.src), "--output", str(tmp / "out" / "dev.tsv"),
            "--model", str(w.backbone), "--task_dir", str(w.data), "--max_output_length", "4", "--device", "cpu",
            "--quiet", *extra]


def importance_argv(w: World, tmp: Path, *extra: str, checkpoint: Path | None = None) -> list[str]:
    return ["--checkpoint", str(checkpoint or w.src / "alpha"), "--task", "alpha", "--model", str(w.backbone),
            "--task_dir", str(w.data), "--max_examples", "2", "--max_output_length", "4",
            "--output_dir", str(tmp / "out"), "--device", "cpu", "--quiet", *extra]


def fusion_argv(w: World, tmp: Path, *extra: str, src: Path | None = None, sim: Path | None = None) -> list[str]:
    return ["--delta", "lora", "--tasks", *TASKS, "--source_ckpt_path", str(src or w.src),
            "--save_ckpt_path", str(tmp / "out"), "--result_tsv", str(sim or w.sim), "--metric", "Loss", *extra]


def average_argv(w: World, tmp: Path, *extra: str, src: Path | None = None) -> list[str]:
    return ["--delta", "lora", "--tasks", *TASKS, "--source_ckpt_path", str(src or w.src),
            "--save_ckpt_path", str(tmp / "out"), *extra]


def study_argv(w: World, tmp: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["--output", str(tmp / "out"), "--model", str(w.backbone), "--task_dir", str(data or w.data),
            "--tasks", " ".join(TASKS), "--targets", "alpha", "--deltas", "lora", "--fusions", "average Loss",
            "--source_k", "16", "--source_iters", "2", "--target_budgets", "2", "--target_data_seeds", "100",
            "--max_examples", "2",
            "--lora_r", "2", "--lora_alpha", "4", *extra]


# --------------------------------------------------------------------------------------------------
# The cases


@dataclass
class Case:
    """``build(world, tmp)`` makes the case's inputs and returns (argv, fragments the error line must hold)."""

    entry: Callable[[list[str]], int] | str  # a main() to call in-process, or a script to run in a subprocess
    build: Callable[[World, Path], tuple[list[str], list[str]]]
    debug: bool = False  # run with --debug: the traceback is expected instead of the one line


def _tsv(content: bytes, lineno: int | None, *words: str, split: str = "train"):
    def build(w: World, tmp: Path):
        data, path = bad_split(w, tmp, content, split=split)
        return tune_argv(w, tmp, data=data), [f"{path}:{lineno}" if lineno else str(path), *words]
    return build


def _flag(make_argv, *extra: str, words: tuple[str, ...]):
    return lambda w, tmp: (make_argv(w, tmp, *extra), list(words))


def _tune_ckpt(which: str, *words: str):
    def build(w: World, tmp: Path):
        ckpt = {"adapter": w.adapter, "lora_r4": w.lora_r4, "other_backbone": w.other_backbone}[which]
        return tune_argv(w, tmp, "--train_checkpoint", str(ckpt)), [str(ckpt), *words]
    return build


def _tune_truncated(w: World, tmp: Path):
    src, weights = truncated_copy(w, tmp)
    return tune_argv(w, tmp, "--train_checkpoint", str(src / "alpha")), [str(weights), "truncated"]


def _tune_result_missing_columns(w: World, tmp: Path):
    result = write(tmp / "out" / "result.tsv", "task\tlr\tdev\nalpha\t0.001\t0.5\n")
    return tune_argv(w, tmp), [f"{result}:1", "expected columns"]


def _tune_result_short_row(w: World, tmp: Path):
    """--train_checkpoint given as a tune.py task folder whose result.tsv has a cut-off row."""
    runs = tmp / "runs"
    shutil.copytree(w.src / "alpha", runs / "alpha" / "lr_0.001_bsz_4" / "checkpoint")
    result = write(runs / "result.tsv", "task\tk\tdata_seed\tlr\tbsz\tdev\ttest\tbest_step\n"
                                        "alpha\t16\t100\t0.001\t4\t0.5\t-\t2\nalpha\t16\t100\n")
    return tune_argv(w, tmp, "--train_checkpoint", str(runs / "alpha")), [f"{result}:3"]


def tune_folder(argv: list[str], task: str = "alpha", lr: float | None = 1e-3, bsz: int | None = 4) -> Path:
    """The folder tune.py would write for ``argv``'s run (or, without lr and bsz, its prediction)."""
    from models.tuning import run_folder

    return run_folder(tune.config_from_args(tune.build_parser().parse_args(argv)), task, lr, bsz)


def _tune_run_exists(w: World, tmp: Path):
    argv = tune_argv(w, tmp)
    run = tune_folder(argv)
    write(run / "log.txt", "an earlier run\n")
    return argv, [str(run), "--overwrite"]


def _tune_predict_exists(w: World, tmp: Path):
    argv = tune_argv(w, tmp, "--test_checkpoint", str(w.src / "alpha"))
    argv.remove("--do_train")
    folder = tune_folder(argv, lr=None, bsz=None)
    write(folder / "log.txt", "an earlier prediction\n")
    return argv, [str(folder), "--overwrite"]


def _tune_output_dir_is_a_file(w: World, tmp: Path):
    path = write(tmp / "out", "not a folder\n")
    return tune_argv(w, tmp), ["--output_dir", str(path), "not a folder"]


def _tune_peft_folder(w: World, tmp: Path):
    """A PEFT LoRA folder (same config file name as AdapterHub's, told apart by its peft_type) whose weights
    file is empty: the PEFT reader names that file."""
    folder = tmp / "peft"
    write(folder / "adapter_config.json", json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                      "target_modules": ["q", "v"]}))
    write(folder / "adapter_model.safetensors", "")
    return tune_argv(w, tmp, "--train_checkpoint", str(folder)), [str(folder / "adapter_model.safetensors"),
                                                                   "not a valid safetensors file"]


def _tune_unknown_task_metric(w: World, tmp: Path):
    data = copy_data(w, tmp)
    metrics = write(data / "task_metrics.tsv", "task\tmetric\nalpha\tBLEU-9\n")
    return tune_argv(w, tmp, data=data), [f"{metrics}:2", "BLEU-9"]


def _score_truncated(w: World, tmp: Path):
    src, weights = truncated_copy(w, tmp, "beta")
    return score_argv(w, tmp, src=src), ["--source_ckpt_path", str(weights)]


def _score_missing_source(w: World, tmp: Path):
    src = copy_sources(w, tmp)
    shutil.rmtree(src / "beta")
    return score_argv(w, tmp, src=src), ["--source_ckpt_path", str(src / "beta")]


def _score_other_backbone(w: World, tmp: Path):
    src = replace_source(w, tmp, "beta", w.other_backbone)
    return score_argv(w, tmp, src=src), [str(src / "beta"), "backbone"]


def _score_result_missing_columns(w: World, tmp: Path):
    result = write(tmp / "out" / "result.tsv", "target\tsource\tscore\nalpha\tbeta\t1.0\n")
    return score_argv(w, tmp), [f"{result}:1"]


def _score_rows_exist(w: World, tmp: Path):
    result = write(tmp / "out" / "result.tsv", "target\tsource\tmetric\tgroup\tscore\n"
                                               "alpha\tbeta\tEL2N\tmodel\t0.5\nbeta\talpha\tLoss\tmodel\t2.5\n")
    return score_argv(w, tmp), [f"{result}:3", "--overwrite"]


def _tuneall_other_settings(w: World, tmp: Path):
    folder = tmp / "out" / "alpha" / "beta"
    model, _ = load_backbone(w.backbone)
    attach_delta(model, LORA)
    save_delta_checkpoint(folder, delta_state_dict(model), LORA, w.backbone.name, backbone_fingerprint(model),
                          task="alpha", extra={"source": "beta", "steps": 99, "lr": 5e-4, "bsz": 2,
                                               "warmup_steps": 20, "seed": 42, "k": 16, "data_seed": 100})
    return tuneall_argv(w, tmp), [str(folder), "steps=99", "--overwrite"]


def _tuneall_not_a_module(w: World, tmp: Path):
    folder = tmp / "out" / "beta" / "alpha"
    write(folder / "notes.txt", "not a module\n")
    return tuneall_argv(w, tmp), [str(folder), "not a delta checkpoint"]


def _devall_output_exists(w: World, tmp: Path):
    table = write(tmp / "out" / "dev.tsv", "target\tsource\tdev_zero_shot\tdev_after\nalpha\tbeta\t0.5\t-\n")
    return devall_argv(w, tmp), [f"--output {table}", "--overwrite"]


def _importance_output_exists(w: World, tmp: Path):
    table = write(tmp / "out" / "importance.tsv", "granularity\tgroup\n")
    return importance_argv(w, tmp), [str(table), "--overwrite"]


def _importance_truncated(w: World, tmp: Path):
    src, weights = truncated_copy(w, tmp)
    return importance_argv(w, tmp, checkpoint=src / "alpha"), ["--checkpoint", str(weights)]


def _fusion_score(value: str):
    def build(w: World, tmp: Path):
        sim, line = sim_with(w, tmp, "1.3", value)
        return fusion_argv(w, tmp, sim=sim), [f"{sim}:{line}", value]
    return build


def _fusion_missing_columns(w: World, tmp: Path):
    sim = write(tmp / "sim.tsv", "target\tsource\tscore\nalpha\tbeta\t1.0\n")
    return fusion_argv(w, tmp, sim=sim), [f"{sim}:1", "missing columns"]


def _fusion_mixed_methods(w: World, tmp: Path):
    src = replace_source(w, tmp, "beta", w.adapter)
    return average_argv(w, tmp, src=src), [str(src / "beta"), "adapter"]


def _fusion_truncated(w: World, tmp: Path):
    src, weights = truncated_copy(w, tmp, "gamma")
    return average_argv(w, tmp, src=src), [str(weights), "truncated"]


def _fusion_output_exists(w: World, tmp: Path):
    shutil.copytree(w.src / "alpha", tmp / "out" / "without_beta")
    return fusion_argv(w, tmp, "--targets", "beta"), [str(tmp / "out" / "without_beta"), "--overwrite"]


def _study_bad_tsv(w: World, tmp: Path):
    data, path = bad_split(w, tmp, b"fine\tyes\nno tab on this line\n", task="gamma", split="dev")
    return study_argv(w, tmp, data=data), [f"{path}:2", "no tab"]


def _study_missing_task(w: World, tmp: Path):
    argv = study_argv(w, tmp)
    argv[argv.index("--tasks") + 1] = "alpha beta delta"
    return argv, ["--tasks", "delta"]


def _study_other_params(w: World, tmp: Path):
    params = dict(vars(study.parse_args(study_argv(w, tmp))))
    params["source_iters"] = 7
    path = write(tmp / "out" / "params.json", json.dumps(params, indent=1))
    return study_argv(w, tmp), [str(path), "source_iters=7"]


def _study_steps_without_params(w: World, tmp: Path):
    """Finished steps whose settings are unknown (params.json lost) are never resumed under this run's settings."""
    write(tmp / "out" / ".steps" / "lora__sources.alpha.json", json.dumps({"outputs": [], "seconds": 1.0}))
    return study_argv(w, tmp), [str(tmp / "out"), "no params.json"]


def _study_other_early_stop(w: World, tmp: Path):
    """A budget's early stopping is part of its outputs: a resumed study may add budgets, not change one's."""
    params = dict(vars(study.parse_args(study_argv(w, tmp))))
    params["target_early_stop"] = "3"
    path = write(tmp / "out" / "params.json", json.dumps(params, indent=1))
    return study_argv(w, tmp), [str(path), "budget 2 with target_early_stop 3, this run asks 0"]


def _study_other_first_budget(w: World, tmp: Path):
    """Budgets may be added on resume, but the first one (tune-all's, and KL's and cos's reference) stays."""
    params = dict(vars(study.parse_args(study_argv(w, tmp))))
    params["target_budgets"] = "5 2"
    path = write(tmp / "out" / "params.json", json.dumps(params, indent=1))
    return study_argv(w, tmp), [str(path), "first budget is 5, this run's 2"]


def _debug_traceback(w: World, tmp: Path):
    data, path = bad_split(w, tmp, b"ok\tyes\nno tab here\n")
    return [*tune_argv(w, tmp, data=data), "--debug"], ["UserInputError", f"{path}:2"]


S_TUNE = str(REPO / "tune.py")
S_SCORE = str(REPO / "get_similarity" / "score.py")
S_OTHERS = str(REPO / "unit_model" / "unit_model_others.py")
S_STUDY = str(REPO / "study.py")

CASES: dict[str, Case] = {
    # ---- tune.py: the split files
    "tune/tsv-no-tab": Case(tune.main, _tsv(b"ok\tyes\nno tab here\n", 2, "no tab")),
    "tune/tsv-empty-output": Case(tune.main, _tsv(b"ok\tyes\nan input\t\n", 2, "non-empty output")),
    "tune/tsv-non-utf8": Case(tune.main, _tsv(b"ok\tyes\nfine\tno\ncaf\xe9\tyes\n", 3, "UTF-8", "0xe9")),
    "tune/tsv-line-over-1mb": Case(tune.main, _tsv(b"ok\tyes\n" + b"a" * 1_000_001 + b"\tyes\n", 2, "1,000,000")),
    "tune/tsv-empty-split": Case(tune.main, _tsv(b"", None, "empty split", split="dev")),
    "tune/unknown-metric-in-task-metrics": Case(tune.main, _tune_unknown_task_metric),
    # ---- tune.py: flags
    "tune/duplicate-task": Case(tune.main, lambda w, t: (tune_argv(w, t, tasks=("alpha", "beta", "alpha")),
                                                         ["--tasks", "alpha"])),
    "tune/duplicate-task-via-list": Case(tune.main, lambda w, t: (
        [*tune_argv(w, t, data=SUITE_DIR, tasks=("SAMPLE_TASKS", "sent_review"))], ["--tasks", "sent_review"])),
    "tune/task-not-in-folder": Case(tune.main, lambda w, t: (tune_argv(w, t, tasks=("alpha", "delta")),
                                                             ["--tasks", "'delta'"])),
    "tune/lr-zero": Case(tune.main, _flag(tune_argv, "--learning_rate_list", "0", words=("--learning_rate_list",))),
    "tune/lr-negative": Case(tune.main, _flag(tune_argv, "--learning_rate_list", "-0.001",
                                              words=("--learning_rate_list", "-0.001"))),
    "tune/lr-nan": Case(tune.main, _flag(tune_argv, "--learning_rate_list", "nan", words=("--learning_rate_list",))),
    "tune/bsz-zero": Case(tune.main, _flag(tune_argv, "--bsz_list", "0", words=("--bsz_list",))),
    "tune/train-iters-zero": Case(tune.main, _flag(tune_argv, "--train_iters", "0", words=("--train_iters",))),
    "tune/train-iters-not-a-number": Case(tune.main, _flag(tune_argv, "--train_iters", "ten",
                                                           words=("--train_iters", "'ten'"))),
    "tune/test-checkpoint-with-do-train": Case(tune.main, lambda w, t: (
        tune_argv(w, t, "--test_checkpoint", str(w.src / "alpha")), ["--test_checkpoint", "--do_train", "ambiguous"])),
    # ---- tune.py: checkpoints and outputs
    "tune/ckpt-truncated": Case(tune.main, _tune_truncated),
    "tune/ckpt-other-backbone": Case(tune.main, _tune_ckpt("other_backbone", "backbone", "num_layers=1")),
    "tune/ckpt-other-method": Case(tune.main, _tune_ckpt("adapter", "method=adapter", "method=lora")),
    "tune/ckpt-other-sizes": Case(tune.main, _tune_ckpt("lora_r4", "lora_r=4", "lora_r=2")),
    "tune/result-tsv-missing-columns": Case(tune.main, _tune_result_missing_columns),
    "tune/result-tsv-short-row": Case(tune.main, _tune_result_short_row),
    "tune/run-folder-exists": Case(tune.main, _tune_run_exists),
    "tune/predict-folder-exists": Case(tune.main, _tune_predict_exists),
    "tune/output-dir-is-a-file": Case(tune.main, _tune_output_dir_is_a_file),
    "tune/ckpt-peft-folder": Case(tune.main, _tune_peft_folder),
    # ---- get_similarity.score
    "score/unknown-metric": Case(score.main, _flag(score_argv, "--metric", "Loss", "Perplexity",
                                                   words=("--metric", "Perplexity"))),
    "score/duplicate-source": Case(score.main, _flag(score_argv, "--source_tasks", "alpha", "beta", "alpha",
                                                     words=("--source_tasks", "alpha"))),
    "score/missing-source": Case(score.main, _score_missing_source),
    "score/truncated-source": Case(score.main, _score_truncated),
    "score/source-other-backbone": Case(score.main, _score_other_backbone),
    "score/result-tsv-missing-columns": Case(score.main, _score_result_missing_columns),
    "score/rows-exist": Case(score.main, _score_rows_exist),
    # ---- tune-all, dev-all, importance
    "tuneall/steps-zero": Case(tune_all.main, _flag(tuneall_argv, "--steps", "0", words=("--steps",))),
    "tuneall/lr-negative": Case(tune_all.main, _flag(tuneall_argv, "--learning_rate", "-1",
                                                     words=("--learning_rate",))),
    "tuneall/duplicate-target": Case(tune_all.main, _flag(tuneall_argv, "--tasks", "alpha", "beta", "beta",
                                                          words=("--tasks", "beta"))),
    "tuneall/module-with-other-settings": Case(tune_all.main, _tuneall_other_settings),
    "tuneall/output-not-a-module": Case(tune_all.main, _tuneall_not_a_module),
    "devall/output-exists": Case(dev_all.main, _devall_output_exists),
    "devall/missing-tuneall-folder": Case(dev_all.main, lambda w, t: (
        devall_argv(w, t, "--tuneall_ckpt_path", str(t / "nowhere")), ["--tuneall_ckpt_path", str(t / "nowhere")])),
    "importance/output-exists": Case(importance.main, _importance_output_exists),
    "importance/truncated-checkpoint": Case(importance.main, _importance_truncated),
    "importance/task-not-in-folder": Case(importance.main, lambda w, t: (
        [a if a != "alpha" else "delta" for a in importance_argv(w, t)], ["'delta'"])),
    # ---- fusion scripts
    "fusion/nan-score": Case(unit_model_others.main, _fusion_score("nan")),
    "fusion/density-above-one": Case(unit_model_average.main, _flag(average_argv, "--merge", "ties", "--density",
                                                                    "1.5", words=("--density", "(0, 1]"))),
    "fusion/unknown-merge": Case(unit_model_average.main, _flag(average_argv, "--merge", "median",
                                                                words=("--merge", "median"))),
    "fusion/ties-on-lora-factors": Case(unit_model_average.main, _flag(
        average_argv, "--merge", "ties", "--lora_combine", "params", words=("--lora_combine params", "delta_w"))),
    "fusion/infinite-score": Case(unit_model_others.main, _fusion_score("inf")),
    "fusion/temperature-zero": Case(unit_model_average.main, _flag(average_argv, "--tem", "0", words=("--tem",))),
    "fusion/temperature-negative": Case(unit_model_others.main, _flag(fusion_argv, "--tem", "-1",
                                                                      words=("--tem", "-1"))),
    "fusion/unknown-metric": Case(unit_model_others.main, lambda w, t: (
        [a if a != "Loss" else "Perplexity" for a in fusion_argv(w, t)], ["--metric", "Perplexity"])),
    "fusion/duplicate-task": Case(unit_model_average.main, _flag(average_argv, "--tasks", "alpha", "beta", "alpha",
                                                                 words=("--tasks", "alpha"))),
    "fusion/duplicate-target": Case(unit_model_average.main, _flag(average_argv, "--targets", "beta", "beta",
                                                                   words=("--targets", "beta"))),
    "fusion/result-tsv-missing-columns": Case(unit_model_others.main, _fusion_missing_columns),
    "fusion/sources-of-two-methods": Case(unit_model_average.main, _fusion_mixed_methods),
    "fusion/truncated-source": Case(unit_model_average.main, _fusion_truncated),
    "fusion/missing-reference-module": Case(unit_model_cos.main, lambda w, t: (
        average_argv(w, t, "--random_tuned_ckpt_path", str(t / "nowhere")), [str(t / "nowhere")])),
    "fusion/output-exists": Case(unit_model_others.main, _fusion_output_exists),
    # ---- the pipeline
    "study/duplicate-target": Case(study.main, lambda w, t: (
        [*study_argv(w, t), "--targets", "alpha alpha"], ["--targets", "alpha"])),
    "study/prefilter-runs-forward-passes": Case(study.main, _flag(study_argv, "--prefilter", "Loss",
                                                                  words=("--prefilter Loss", "no forward pass"))),
    "study/prefilter-of-another-method": Case(study.main, _flag(study_argv, "--deltas", "ia3", "--prefilter", "Arrow",
                                                                words=("--prefilter Arrow", "--deltas ia3"))),
    "study/estimator-of-another-method": Case(study.main, _flag(study_argv, "--deltas", "ia3", "--fusions", "Arrow",
                                                                words=("--fusions Arrow", "lora", "ia3"))),
    "study/task-not-in-folder": Case(study.main, _study_missing_task),
    "study/bad-tsv-in-a-later-stage": Case(study.main, _study_bad_tsv),
    "study/lr-nan": Case(study.main, _flag(study_argv, "--target_lr", "nan", words=("--target_lr",))),
    "study/temperature-zero": Case(study.main, _flag(study_argv, "--tem", "0", words=("--tem",))),
    "study/unknown-fusion-metric": Case(study.main, _flag(study_argv, "--fusions", "average Perplexity",
                                                          words=("--fusions", "Perplexity"))),
    "study/output-of-another-study": Case(study.main, _study_other_params),
    "study/steps-without-params": Case(study.main, _study_steps_without_params),
    "study/unknown-merge-operator": Case(study.main, _flag(study_argv, "--fusions", "average Loss+median",
                                                           words=("--fusions", "'median'", "ties"))),
    "study/learned-from-an-unknown-metric": Case(study.main, _flag(
        study_argv, "--fusions", "average learned:Perplexity", words=("'learned:Perplexity'", "learned:METRIC"))),
    "study/density-zero": Case(study.main, _flag(study_argv, "--density", "0", words=("--density", "(0, 1]"))),
    "study/early-stop-of-a-budget-changed": Case(study.main, _study_other_early_stop),
    "study/first-budget-changed": Case(study.main, _study_other_first_budget),
    "study/data-seed-not-a-number": Case(study.main, _flag(study_argv, "--target_data_seeds", "13 x",
                                                           words=("--target_data_seeds", "'13 x'"))),
    "study/budget-listed-twice": Case(study.main, _flag(study_argv, "--target_budgets", "40 40",
                                                        words=("--target_budgets", "listed twice"))),
    "study/early-stop-per-budget": Case(study.main, _flag(study_argv, "--target_early_stop", "0 1 2",
                                                          words=("--target_early_stop", "one per budget (1)"))),
    "study/data-seed-without-files": Case(study.main, _flag(study_argv, "--target_data_seeds", "100 13",
                                                            words=("alpha_16_13_train.tsv",))),
    # ---- the real scripts, in a subprocess: exit code and stderr as a user sees them
    "subprocess/tune-no-tab": Case(S_TUNE, _tsv(b"ok\tyes\nno tab here\n", 2, "no tab")),
    "subprocess/score-unknown-metric": Case(S_SCORE, _flag(score_argv, "--metric", "Perplexity",
                                                           words=("--metric", "Perplexity"))),
    "subprocess/fusion-nan-score": Case(S_OTHERS, _fusion_score("nan")),
    "subprocess/study-duplicate-target": Case(S_STUDY, lambda w, t: (
        [*study_argv(w, t), "--targets", "alpha alpha"], ["--targets", "alpha"])),
    "subprocess/tune-debug-shows-traceback": Case(S_TUNE, _debug_traceback, debug=True),
}


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under ``roots``: folders by name, files by (mtime, size, sha256)."""
    state: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                state[os.path.join(dirpath, d)] = ("dir",)
            for f in filenames:
                path = Path(dirpath) / f
                st = path.stat()
                state[str(path)] = (st.st_mtime_ns, st.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def run_case(case: Case, argv: list[str], capsys) -> tuple[int, str, str]:
    if isinstance(case.entry, str):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, case.entry, *argv], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        return proc.returncode, proc.stdout, proc.stderr
    capsys.readouterr()
    code = run_cli(case.entry, argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, world: World, tmp_path: Path, capsys) -> None:
    case = CASES[name]
    argv, fragments = case.build(world, tmp_path)
    before = snapshot(world.root, tmp_path)
    code, out, err = run_case(case, argv, capsys)
    assert snapshot(world.root, tmp_path) == before, "the command changed or left files behind"
    lines = err.strip().splitlines()
    if case.debug:
        assert code == 1 and lines[0].startswith("Traceback"), err[-2000:]
        assert all(f in lines[-1] for f in fragments), lines[-1]
        return
    assert_one_line_refusal(code, out, err, fragments)


def assert_one_line_refusal(code: int, out: str, err: str, fragments: list[str]) -> None:
    """Exit 2, one ``error:`` line holding every fragment, no traceback, nothing on stdout."""
    lines = err.strip().splitlines()
    assert code == 2, f"exit code {code}; stderr: {err[-2000:]}"
    assert "Traceback" not in err
    assert len(lines) == 1 and err.endswith("\n"), f"expected exactly one line, found:\n{err}"
    assert lines[0].startswith("error: ")
    missing = [f for f in fragments if f not in lines[0]]
    assert not missing, f"{missing} not in: {lines[0]}"
    assert out == "", f"printed before refusing: {out}"


def test_bad_input_matrix_is_large_and_covers_every_entry_point() -> None:
    entries = {getattr(c.entry, "__module__", c.entry) for c in CASES.values()}
    assert len(CASES) >= 30
    for needed in ("tune", "get_similarity.score", "get_similarity.tune_all", "get_similarity.dev_all",
                   "get_similarity.importance", "unit_model.unit_model_others", "study", S_TUNE, S_STUDY):
        assert needed in entries, needed


def test_crlf_split_trains_exactly_like_lf(world: World, tmp_path: Path, capsys) -> None:
    """CRLF line endings (and a UTF-8 BOM) are read as the same examples: the runs are bit-identical."""
    lf, crlf = tmp_path / "lf", tmp_path / "crlf"
    _write_tasks(lf, ("alpha",))
    _write_tasks(crlf, ("alpha",))
    for split in ("train", "dev", "test"):
        path = split_file(crlf, "alpha", split)
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    outs = []
    for data in (lf, crlf):
        argv = tune_argv(world, tmp_path / f"{data.name}_runs", data=data)
        assert run_cli(tune.main, argv) == 0, capsys.readouterr().err
        outs.append(tmp_path / f"{data.name}_runs" / "out")
    run = only_run(outs[0] / "alpha").relative_to(outs[0])
    assert only_run(outs[1] / "alpha").relative_to(outs[1]) == run
    for name in ("result.tsv", run / "curve.tsv", run / "test_predictions.tsv",
                 run / "checkpoint" / "delta.safetensors"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
