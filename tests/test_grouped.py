"""Grouped runs (several modules per forward pass, models/group.py) against one-at-a-time runs.

With dropout off (the tiny backbone has none) a module trained in a group must be the module trained alone:
the losses at every logged step within 1e-5 relative, the checkpoints within 1e-4, the same dev and test
scores. Each of the four delta methods is checked under both compositions: ``Parallel`` (runs that share a
batch: a learning-rate sweep on one task) and ``BatchSplit`` (runs on different tasks).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from transformers import T5Config

import tune
from dataloader.crossfit import load_task
from dataloader.metrics import metric_for_task
from get_similarity import dev_all, score, tune_all
from models.delta import DeltaConfig, save_delta_checkpoint
from models.evaluate import decoding_for
from models.formats import load_delta_checkpoint
from models.group import (
    chunks,
    composition,
    ensure_slots,
    load_slot_state,
    pick_group_size,
    slot_bytes,
    slot_name,
    slot_state,
    total_memory_bytes,
)
from models.settings import TrainConfig
from models.trainer import Run, RunLog, TaskData, Trainer
from tests.conftest import SUITE_DIR
from utils.errors import run_cli

SIZES = {"lora_r": 2, "prefix_length": 3, "prefix_mlp": 8, "adapter_size": 4}
METHODS = ["adapter", "lora", "prefix", "ia3"]


def make_trainer(backbone: Path, method: str, **overrides) -> Trainer:
    settings = dict(train_iters=6, valid_interval=3, log_interval=1, warmup_steps=1, max_output_length=8,
                    early_stop=0, do_predict=True)
    config = TrainConfig(model=str(backbone), **{**settings, **overrides})
    return Trainer(config, DeltaConfig(method, **SIZES))


def task_data(trainer: Trainer, name: str) -> TaskData:
    raw = load_task(SUITE_DIR, name, 16, 100, ["train", "dev", "test"])
    metric = metric_for_task(name, SUITE_DIR)
    decoding = decoding_for(trainer.config, trainer.tokenizer, metric, raw["train"] + raw["dev"])
    return TaskData(name, metric, {s: trainer.encode(raw[s]) for s in raw}, decoding)


def quiet_log() -> RunLog:
    return RunLog(None, console=False)


def assert_close_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for name in a:
        scale = b[name].abs().max().clamp(min=1e-6)
        assert (a[name] - b[name]).abs().max() / scale <= rtol, name


def assert_same_run(grouped, alone) -> None:
    assert grouped.failed is None and alone.failed is None
    assert [s for s, _ in grouped.losses] == [s for s, _ in alone.losses]
    for (_, g), (_, s) in zip(grouped.losses, alone.losses):
        assert g == pytest.approx(s, rel=1e-5)
    assert grouped.dev == alone.dev and grouped.test == alone.test and grouped.best_step == alone.best_step
    assert_close_states(grouped.state, alone.state)


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A start that differs per run, as tune-all's sources do."""
    g = torch.Generator().manual_seed(seed)
    return {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in state.items()}


@pytest.mark.parametrize("method", METHODS)
def test_parallel_group_equals_runs_alone(method, family_backbone_dir):
    trainer = make_trainer(family_backbone_dir, method)
    task = task_data(trainer, "sent_review")
    starts = [perturbed(trainer.init_state, i) for i in range(3)]
    runs = [Run(task, lr, 4, start, f"start {i}", None, quiet_log())
            for i, (lr, start) in enumerate(zip((1e-3, 3e-3, 1e-2), starts))]
    grouped = trainer.train_group(runs)
    alone = [trainer.train_group([run])[0] for run in runs]
    for g, s in zip(grouped, alone):
        assert_same_run(g, s)
    assert len({round(r.losses[-1][1], 6) for r in grouped}) == 3  # the three runs really differ


@pytest.mark.parametrize("method", METHODS)
def test_batch_split_group_equals_runs_alone(method, family_backbone_dir):
    trainer = make_trainer(family_backbone_dir, method)
    tasks = [task_data(trainer, t) for t in ("sent_review", "topic_news", "nli_support")]
    runs = [Run(task, 1e-2, bsz, trainer.init_state, "random", None, quiet_log())
            for task, bsz in zip(tasks, (4, 3, 5))]
    grouped = trainer.train_group(runs)
    alone = [trainer.train_group([run])[0] for run in runs]
    for g, s in zip(grouped, alone):
        assert_same_run(g, s)


def test_early_stop_leaves_the_group_and_the_others_go_on(tiny_backbone_dir):
    trainer = make_trainer(tiny_backbone_dir, "lora", train_iters=12, valid_interval=2, early_stop=1)
    task = task_data(trainer, "sent_review")
    runs = [Run(task, lr, 4, trainer.init_state, "random", None, quiet_log()) for lr in (1e-5, 3e-2)]
    grouped = trainer.train_group(runs)
    alone = [trainer.train_group([run])[0] for run in runs]
    for g, s in zip(grouped, alone):
        assert_same_run(g, s)
    steps = [r.losses[-1][0] for r in grouped]
    assert min(steps) < 12  # one run stopped early, and (checked above) the other still equals its run alone


def test_a_module_whose_loss_is_nan_is_dropped_and_the_others_go_on(tiny_backbone_dir):
    trainer = make_trainer(tiny_backbone_dir, "lora")
    task = task_data(trainer, "sent_review")
    broken = {n: torch.full_like(t, float("nan")) for n, t in trainer.init_state.items()}
    runs = [Run(task, 1e-2, 4, start, name, None, quiet_log())
            for start, name in ((trainer.init_state, "random"), (broken, "broken"),
                                (perturbed(trainer.init_state, 1), "other"))]
    grouped = trainer.train_group(runs)
    assert grouped[1].failed is not None and "nan" in grouped[1].failed.lower()
    assert grouped[1].state is None
    for i in (0, 2):
        assert_same_run(grouped[i], trainer.train_group([runs[i]])[0])


def test_slot_states_round_trip_under_canonical_names(tiny_backbone_dir):
    trainer = make_trainer(tiny_backbone_dir, "prefix")
    slots = ensure_slots(trainer.model, trainer.cfg, 3)
    assert slots == [slot_name(0), slot_name(1), slot_name(2)]
    state = perturbed(trainer.init_state, 7)
    load_slot_state(trainer.model, slots[2], state, "test")
    assert_close_states(slot_state(trainer.model, slots[2]), state, rtol=0)
    assert slot_state(trainer.model, slots[0]).keys() == state.keys()
    assert type(composition(slots)).__name__ == "Parallel"
    assert type(composition(slots, [2, 2, 2])).__name__ == "BatchSplit"
    assert composition(slots[:1]) == slots[0]


def test_group_size_auto_fits_the_budget_and_a_number_is_taken_as_given(tiny_backbone_dir):
    config, cpu = T5Config(d_model=768, d_ff=3072, num_layers=12, num_decoder_layers=12, vocab_size=32128), \
        torch.device("cpu")
    size, why = pick_group_size(4, 19, config, cpu, 8, 64, True)
    assert size == 4 and "4" in why
    assert pick_group_size(8, 3, config, cpu, 8, 64, True)[0] == 3
    # t5-base shape: 24 layers x 24 x 768 + 32128 = 474,496 values per token; 8 x 64 tokens x 4 bytes x 3
    assert slot_bytes(config, 8, 64, True) == 8 * 64 * (24 * 24 * 768 + 32128) * 4 * 3
    size, why = pick_group_size("auto", 19, config, cpu, 8, 64, True)
    expected = min(19, int(total_memory_bytes(cpu) * 0.25 // slot_bytes(config, 8, 64, True)), 32)
    assert size == max(1, expected) and "auto" in why
    assert pick_group_size("auto", 19, config, cpu, 8, 64, True, memory_fraction=1e-12)[0] == 1


# --------------------------------------------------------------------------------------------------
# Every stage's entry point, grouped (the default, auto) against --group_size 1

STAGE_TASKS = ["sent_review", "sent_tweet", "topic_news"]


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def close_rows(a: list[dict[str, str]], b: list[dict[str, str]], column: str, rel: float) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != column} == {k: v for k, v in y.items() if k != column}
        assert float(x[column]) == pytest.approx(float(y[column]), rel=rel, abs=1e-9), x


def make_stage_sources(backbone: Path, root: Path, methods: list[str]) -> Path:
    """root/{method}/{task}: a perturbed module per task and method, standing in for tuned sources."""
    for method in methods:
        trainer = make_trainer(backbone, method)
        for i, task in enumerate(STAGE_TASKS):
            save_delta_checkpoint(root / method / task, perturbed(trainer.init_state, 10 + i), trainer.cfg,
                                  trainer.backbone, trainer.fingerprint, task=task)
    return root


@pytest.fixture(scope="module")
def stage_sources(tiny_backbone_dir, tmp_path_factory) -> Path:
    return make_stage_sources(tiny_backbone_dir, tmp_path_factory.mktemp("stage_sources"), METHODS)


# The causal family through the stages: LoRA (whose library generation needs no cache) and prefix (eager attention).
CAUSAL_STAGE_METHODS = ["lora", "prefix"]


@pytest.fixture(scope="module")
def causal_stage_sources(tiny_causal_dir, tmp_path_factory) -> Path:
    return make_stage_sources(tiny_causal_dir, tmp_path_factory.mktemp("causal_stage_sources"), CAUSAL_STAGE_METHODS)


def common_args(backbone: Path) -> list[str]:
    return ["--model", str(backbone), "--task_dir", str(SUITE_DIR), "--max_output_length", "8", "--quiet"]


@pytest.mark.parametrize("method", METHODS)
def test_tune_py_sweep_grouped_equals_one_at_a_time(method, tiny_backbone_dir, tmp_path):
    outs = {}
    for size in ("auto", "1"):
        out = outs[size] = tmp_path / f"g{size}"
        argv = ["--do_train", "--do_predict", "--tune_method", method, *common_args(tiny_backbone_dir),
                "--tasks", "sent_review", "topic_news", "--learning_rate_list", "1e-3", "1e-2", "--bsz_list", "4",
                "--train_iters", "4", "--valid_interval", "2", "--log_interval", "1", "--warmup_steps", "1",
                "--output_dir", str(out), "--group_size", size, *size_flags()]
        assert run_cli(tune.main, argv) == 0
    grouped, alone = read_tsv(outs["auto"] / "result.tsv"), read_tsv(outs["1"] / "result.tsv")
    assert grouped == alone and len(grouped) == 4  # same dev, test and best step, in sweep order
    for run in sorted(outs["1"].glob("*/lr_*")):
        twin = outs["auto"] / run.parent.name / run.name
        assert_close_states(load_delta_checkpoint(twin / "checkpoint")[0], load_delta_checkpoint(run / "checkpoint")[0])
        curves = read_tsv(twin / "curve.tsv"), read_tsv(run / "curve.tsv")
        assert [(r["step"], r["dev"]) for r in curves[0]] == [(r["step"], r["dev"]) for r in curves[1]]
        for g, a in zip(*curves):  # losses logged with 4 decimals: equal up to that rounding
            assert g["train_loss"] == a["train_loss"] == "-" or \
                float(g["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=1e-5, abs=1e-4)


def size_flags() -> list[str]:
    return [x for name, value in SIZES.items() for x in (f"--{name}", str(value))]


@pytest.mark.parametrize("family,method", [("seq2seq", m) for m in METHODS] +
                         [("causal", m) for m in CAUSAL_STAGE_METHODS])
def test_tune_all_dev_all_and_similarity_grouped_equal_one_at_a_time(family, method, request, tmp_path):
    backbone = request.getfixturevalue("tiny_backbone_dir" if family == "seq2seq" else "tiny_causal_dir")
    sources = request.getfixturevalue("stage_sources" if family == "seq2seq" else "causal_stage_sources") / method
    base = [*common_args(backbone), "--tasks", *STAGE_TASKS, "--source_ckpt_path", str(sources)]
    for size in ("auto", "1"):
        tuned = tmp_path / f"tuneall{size}"
        assert run_cli(tune_all.main, [*base, "--output_dir", str(tuned), "--steps", "3", "--bsz", "4",
                                       "--learning_rate", "1e-2", "--group_size", size]) == 0
        assert run_cli(dev_all.main, [*base, "--tuneall_ckpt_path", str(tuned), "--group_size", size,
                                      "--output", str(tmp_path / f"devall{size}.tsv")]) == 0
        assert run_cli(score.main, [*base, "--delta", method, "--metric", "all", "--granularity", "block",
                                    "--random_tuned_ckpt_path", str(sources), "--max_examples", "6",
                                    "--batch_size", "4", "--group_size", size,
                                    "--output_dir", str(tmp_path / f"similarity{size}")]) == 0
    for pair in sorted((tmp_path / "tuneall1").glob("*/*")):
        twin = tmp_path / "tuneallauto" / pair.parent.name / pair.name
        grouped, alone = load_delta_checkpoint(twin), load_delta_checkpoint(pair)
        assert_close_states(grouped[0], alone[0])
        assert grouped[1]["score"] == alone[1]["score"]
    assert read_tsv(tmp_path / "devallauto.tsv") == read_tsv(tmp_path / "devall1.tsv")
    close_rows(read_tsv(tmp_path / "similarityauto" / "result.tsv"), read_tsv(tmp_path / "similarity1" / "result.tsv"),
               "score", rel=1e-5)


def test_tune_all_reports_a_diverging_pair_and_saves_the_others(stage_sources, tiny_backbone_dir, tmp_path, capsys):
    sources = tmp_path / "sources"
    shutil.copytree(stage_sources / "lora", sources)
    tensors, meta = load_delta_checkpoint(sources / "sent_tweet")
    cfg = DeltaConfig.from_checkpoint_meta(meta)
    # finite on disk (a NaN module is refused when read), but its update overflows float32: training diverges
    save_delta_checkpoint(sources / "sent_tweet", {n: torch.full_like(t, 1e30) for n, t in tensors.items()},
                          cfg, meta["backbone"], meta["backbone_fingerprint"], task="sent_tweet")
    out = tmp_path / "tuneall"
    argv = [*common_args(tiny_backbone_dir), "--tasks", *STAGE_TASKS, "--source_ckpt_path", str(sources),
            "--output_dir", str(out), "--steps", "3", "--bsz", "4", "--group_size", "4"]
    assert run_cli(tune_all.main, argv) == 1
    err = capsys.readouterr().err
    assert "2 pair(s) not saved" in err and "sent_review <- sent_tweet" in err and "topic_news <- sent_tweet" in err
    saved = {(p.parent.name, p.name) for p in out.glob("*/*") if p.is_dir()}
    assert saved == {("sent_review", "topic_news"), ("sent_tweet", "sent_review"), ("sent_tweet", "topic_news"),
                     ("topic_news", "sent_review")}


def test_chunks_are_as_few_and_as_even_as_the_size_allows():
    assert chunks(list(range(20)), 19) == [list(range(10)), list(range(10, 20))]
    assert chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert chunks(list(range(4)), 8) == [[0, 1, 2, 3]]
    assert chunks([], 4) == []
    assert [len(c) for c in chunks(list(range(19)), 1)] == [1] * 19


def test_auto_on_the_cpu_groups_only_runs_that_share_their_batches():
    from models.tuning import sweep_groups

    runs = [("s", t, lr, bsz) for t in ("a", "b") for lr in (1e-3, 3e-3) for bsz in (4, 8)]
    groups = sweep_groups(runs, 8, shared_batches_only=True)
    assert all(len({(r[1], r[3]) for r in g}) == 1 for g in groups)  # one task and batch size each: Parallel
    assert sorted(r for g in groups for r in g) == sorted(runs) and len(groups) == 4
    assert sweep_groups(runs, 8, shared_batches_only=False) == [runs]  # a number, or a GPU: as given
