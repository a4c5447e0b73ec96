"""Fast evaluation: label sets, the short generation budget (exact), rank classification, the CUDA step."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch

import tune
from dataloader.crossfit import Example, load_task
from dataloader.metrics import metric_for_task, score
from models.backbone import load_backbone
from models.delta import DeltaConfig, attach_delta, load_delta_state
from models.evaluate import evaluate
from models.examples import (
    MAX_LABELS,
    encode_examples,
    generate,
    label_set,
    rank_classify,
    rank_scores,
    training_examples,
)
from models.formats import load_delta_checkpoint
from models.settings import TrainConfig
from models.trainer import Trainer
from tests.conftest import DEFAULT_MODEL_DIR, SUITE_DIR, only_run
from utils.errors import run_cli

TASK = "sent_review"
TRAIN = ["--do_train", "--do_predict", "--tune_method", "lora", "--lora_r", "8", "--tasks", TASK,
         "--train_iters", "60", "--valid_interval", "20", "--log_interval", "20", "--warmup_steps", "5",
         "--learning_rate_list", "3e-3", "--bsz_list", "8", "--quiet", "--log_file_only"]


def ex(output: str, *more: str) -> Example:
    return Example(f"text {output}", (output, *more))


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


# ---------------------------------------------------------------------------------------------- label sets
def test_label_set_rule():
    binary = [ex("yes"), ex("no"), ex("yes"), ex("no")]
    assert label_set(binary, "ACC") == ["no", "yes"]
    assert label_set(binary, "Classification-F1") == ["no", "yes"]
    assert label_set(binary, "Matthew-Correlation") == ["no", "yes"]
    assert label_set(binary) == ["no", "yes"]  # no metric: the examples alone decide
    assert label_set(binary, "EM") is None  # not a classification metric
    assert label_set(binary, "Rouge-L") is None
    assert label_set([*binary, ex("yes", "yeah")], "ACC") is None  # an example with two gold outputs
    assert label_set([ex("a"), ex("b"), ex("c"), ex("a"), ex("b")], "ACC") is None  # 2 * 3 labels > 5 examples
    assert label_set([ex("a"), ex("b"), ex("c"), ex("a"), ex("b"), ex("c")], "ACC") == ["a", "b", "c"]
    most = [ex(f"label{i}") for i in range(MAX_LABELS)] * 2
    assert label_set(most, "ACC") == sorted(f"label{i}" for i in range(MAX_LABELS))
    assert label_set([*most, ex("extra"), ex("extra")], "ACC") is None  # one label too many
    assert label_set([], "ACC") is None


def test_bundled_label_tasks():
    """Every classification family of the suite has a label set; QA and extraction have none."""
    expected = {"sent_review": ["negative", "positive"], "topic_news": ["animals", "food", "sports"],
                "nli_entail": ["entailment", "neutral"], "qa_which": None, "ext_animals": None}
    for task, labels in expected.items():
        splits = load_task(SUITE_DIR, task, 16, 100, ["train", "dev"])
        metric = metric_for_task(task, SUITE_DIR)
        assert label_set(splits["train"] + splits["dev"], metric) == labels, task


# ---------------------------------------------------------------------------------------------- generation
def test_sorting_keeps_predictions(tiny_backbone_dir):
    model, tokenizer = load_backbone(tiny_backbone_dir)
    examples = load_task(SUITE_DIR, TASK, 16, 100, ["dev"])["dev"]
    task = encode_examples(tokenizer, examples, 256, 12)
    assert generate(model, tokenizer, task, 5, 12, sort_by_length=False) == generate(model, tokenizer, task, 5, 12)


def test_short_budget_cuts_only_rows_that_go_on():
    """The embedded default on ext_names (zero-shot): 15 dev outputs of 5 or 6 tokens and one that runs to
    the 32-token budget. With 7 tokens (6 + EOS), the 15 rows that end in time keep their prediction exactly;
    the long one is cut to a prefix of its prediction. That is what the label budget relies on."""
    model, tokenizer = load_backbone(DEFAULT_MODEL_DIR)
    examples = load_task(SUITE_DIR, "ext_names", 16, 100, ["dev"])["dev"]
    task = encode_examples(tokenizer, examples, 256, 32)
    full = generate(model, tokenizer, task, 64, 32)
    short = generate(model, tokenizer, task, 64, 7)
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in full]
    assert sorted(lengths) == [5] * 5 + [6] * 10 + [32]
    for n, f, s in zip(lengths, full, short):
        if n + 1 <= 7:
            assert s == f
        else:
            assert s != f and f.startswith(s) and len(tokenizer(s, add_special_tokens=False).input_ids) == 7


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A LoRA module of the embedded default trained 60 steps on sent_review (16 shots)."""
    out = tmp_path_factory.mktemp("fast_eval") / "auto"
    assert run_cli(tune.main, [*TRAIN, "--output_dir", str(out)]) == 0
    return out


@pytest.mark.slow
def test_auto_budget_changes_no_prediction(trained, tmp_path):
    """Same run with --max_new_tokens auto (2 on sent_review: one label token + EOS) and with the full 32:
    identical dev curve, checkpoint and test predictions (every prediction of this run is a label)."""
    run = only_run(trained / TASK)
    log = (run / "log.txt").read_text()
    assert "validation: generation, max_new_tokens 2 (label task: the longest label + EOS)" in log
    full = tmp_path / "full"
    assert run_cli(tune.main, [*TRAIN, "--output_dir", str(full), "--max_new_tokens", "32"]) == 0
    full_run = only_run(full / TASK)  # another decoding budget: another run, in a folder of its own name
    assert full_run.name != run.name
    assert "validation: generation, max_new_tokens 32\n" in (full_run / "log.txt").read_text()
    assert read_rows(full_run / "curve.tsv") == read_rows(run / "curve.tsv")
    assert read_rows(full_run / "test_predictions.tsv") == read_rows(run / "test_predictions.tsv")
    a, _ = load_delta_checkpoint(run / "checkpoint")
    b, _ = load_delta_checkpoint(full_run / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- ranking
def load_trained(trained: Path):
    model, tokenizer = load_backbone(DEFAULT_MODEL_DIR)
    attach_delta(model, DeltaConfig("lora", lora_r=8, lora_alpha=16))
    tensors, _ = load_delta_checkpoint(only_run(trained / TASK) / "checkpoint")
    load_delta_state(model, tensors, "trained")
    return model, tokenizer


def agreement(a: list[str], b: list[str]) -> float:
    assert len(a) == len(b)
    return sum(x == y for x, y in zip(a, b)) / len(a)


def test_rank_classification_agrees_with_generation(trained):
    """Properties, not one machine's numbers: the trained module's dev ACC after 60 steps moves with the CPU's
    kernels (0.8125 on an AVX-512 machine, 0.75 on an AVX2 one), so no score is asserted exactly."""
    model, tokenizer = load_trained(trained)
    splits = load_task(SUITE_DIR, TASK, 16, 100, ["train", "dev"])
    labels = label_set(splits["train"] + splits["dev"], "ACC")
    assert labels == ["negative", "positive"]
    dev = encode_examples(tokenizer, splits["dev"], 256, 32)
    generated = generate(model, tokenizer, dev, 64, 32)
    assert set(generated) <= set(labels)  # the module has learned to answer with a label
    ranked = rank_classify(model, tokenizer, dev, labels, 3)  # 3 // 2 labels: one example per batch
    assert agreement(ranked, generated) >= 0.9
    # Batch size changes padding and so the summation order: the scores agree to float32 rounding (log-probs of a
    # few tokens, |score| < 50, so 1e-4 absolute is far above rounding and far below a real difference).
    torch.testing.assert_close(rank_scores(model, tokenizer, dev, labels, 3),
                               rank_scores(model, tokenizer, dev, labels, 64), rtol=0, atol=1e-4)
    references = [list(e.outputs) for e in dev.examples]
    gen_score, gen_predictions = evaluate(model, tokenizer, dev, "ACC", 64, 32)
    rank_score, predictions = evaluate(model, tokenizer, dev, "ACC", 64, 32, labels=labels)
    assert gen_predictions == generated and predictions == rank_classify(model, tokenizer, dev, labels, 64)
    assert rank_score == score("ACC", predictions, references) and gen_score == score("ACC", generated, references)
    assert rank_score > 0.5 and gen_score > 0.5  # above a uniform guess between the two labels

    # The score of one example: summed log-probabilities of the label's tokens (EOS included), by hand.
    scores = rank_scores(model, tokenizer, dev, labels, 64)
    assert scores.shape == (16, 2)
    i = 3
    for j, label in enumerate(labels):
        target = torch.tensor([tokenizer(label).input_ids])
        assert target[0, -1].item() == tokenizer.eos_token_id
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([dev.inputs[i]]), labels=target).logits
        by_hand = torch.log_softmax(logits[0], dim=-1)[torch.arange(target.shape[1]), target[0]].sum().item()
        assert scores[i, j].item() == pytest.approx(by_hand, abs=1e-4)
    assert ranked[i] == labels[int(scores[i].argmax())]


def test_tune_rank_classification_flag(trained, tmp_path):
    """--rank_classification ranks label tasks and generates for the others; it is logged per task."""
    out = tmp_path / "ranked"
    argv = ["--do_predict", "--test_checkpoint", str(trained / TASK), "--tune_method", "lora", "--lora_r", "8",
            "--tasks", TASK, "qa_which", "--rank_classification", "--quiet", "--log_file_only",
            "--output_dir", str(out)]
    assert run_cli(tune.main, argv) == 0
    log = (only_run(out / TASK, "predict_*") / "log.txt").read_text()
    assert "rank classification over 2 labels (negative, positive)" in log
    assert "generation, max_new_tokens 32" in (only_run(out / "qa_which", "predict_*") / "log.txt").read_text()
    rows = {r["task"]: r for r in read_rows(out / "result.tsv")}
    trained_row = read_rows(trained / "result.tsv")[0]
    ranked = read_rows(only_run(out / TASK, "predict_*") / "test_predictions.tsv")
    generated = read_rows(only_run(trained / TASK) / "test_predictions.tsv")
    assert [r["input"] for r in ranked] == [r["input"] for r in generated]
    # Two decoders of one module: they agree on most of the 200 test examples (all of them on the machine this
    # was written on), and so do their scores; which examples differ depends on the CPU's kernels.
    assert agreement([r["prediction"] for r in ranked], [r["prediction"] for r in generated]) >= 0.9
    assert float(rows[TASK]["test"]) == pytest.approx(float(trained_row["test"]), abs=0.1)


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_bad_max_new_tokens(value, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_cli(tune.main, [*TRAIN, "--output_dir", str(out), "--max_new_tokens", value])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --max_new_tokens") and err.count("\n") == 1
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_step_does_not_sync(tmp_path):
    """On CUDA with bf16, a training step (pinned copy, forward, backward, clipping, AdamW, scheduler) never
    waits for the device: torch's sync debug mode turns any synchronising call into an error."""
    args = tune.build_parser().parse_args(["--do_train", "--tune_method", "lora", "--lora_r", "8", "--device", "cuda",
                                           "--bf16"])
    cfg = tune.check_args(args)
    trainer = Trainer(TrainConfig.from_values(args), cfg)
    examples = load_task(SUITE_DIR, TASK, 16, 100, ["train"])["train"]
    task = trainer.encode(examples)
    optimizer = torch.optim.AdamW(trainer.params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batches = training_examples(task, 8, random.Random(0))
    trainer.model.train()
    trainer.step(*next(batches), optimizer, scheduler)  # first step: lazy CUDA initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [trainer.step(*next(batches), optimizer, scheduler) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(loss.device.type == "cuda" for loss in losses)
    assert torch.isfinite(torch.stack(losses)).all().item()
