"""Zero-shot similarity metrics: hand-computed values, GraNd against manual autograd, score.py end to end."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dataloader.crossfit import load_task
from get_similarity import score as score_cli
from get_similarity import scoring
from get_similarity.metrics import (
    METRICS,
    TokenMean,
    grad_norm,
    per_example_grad_norms,
    pooled_mean,
    resolve_metrics,
    token_el2n,
    token_kl,
    token_logits_cos,
    token_loss,
)
from get_similarity.scoring import SimilarityScorer, delta_groups
from models.backbone import load_backbone
from models.delta import (
    DeltaConfig,
    attach_delta,
    backbone_fingerprint,
    delta_state_dict,
    load_delta_state,
    param_group,
    save_delta_checkpoint,
)
from models.examples import encode_examples, first_output_batches
from models.formats import inspect_delta_checkpoint, load_delta_checkpoint
from tests.conftest import REPO, SUITE_DIR
from utils.errors import UserInputError, run_cli

TASKS = ["sent_review", "sent_tweet", "topic_news"]
CONFIGS = {
    "adapter": DeltaConfig("adapter", adapter_size=4),
    "lora": DeltaConfig("lora", lora_r=4, lora_alpha=8),
    "prefix": DeltaConfig("prefix", prefix_length=3, prefix_mlp=8),
    "ia3": DeltaConfig("ia3"),
}
INIT_SEED = 42  # score.py's default --init_seed


# --- hand-computed token metrics ----------------------------------------------------------------------

# Two examples, two positions, vocabulary of 3. Example 1's second position is label padding (-100):
# its extreme logits must not count.
LOGITS = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]],
                       [[3.0, 0.0, 0.0], [9.0, -9.0, 5.0]]])
LABELS = torch.tensor([[1, 2], [0, -100]])


def probs(logits: list[float]) -> list[float]:
    z = sum(math.exp(x) for x in logits)
    return [math.exp(x) / z for x in logits]


P_A = probs([1.0, 2.0, 0.0])  # token (0, 0), gold 1
P_C = probs([3.0, 0.0, 0.0])  # token (1, 0), gold 0
# token (0, 1) is uniform with gold 2: loss log 3, EL2N sqrt(2/3), cosine 1/sqrt(3)


def pooled_and_per_example(a: float, b: float, c: float) -> tuple[float, float]:
    return (a + b + c) / 3, ((a + b) / 2 + c) / 2


def check_token_metric(fn, expected: tuple[float, float, float], reference: torch.Tensor | None = None) -> None:
    values, mask = fn(LOGITS, LABELS, reference)
    assert mask.tolist() == [[True, True], [True, False]]
    assert values[1, 1].item() == 0.0
    assert values[mask].tolist() == pytest.approx(list(expected), rel=1e-6)
    pooled, per_example = pooled_and_per_example(*expected)
    assert pooled_mean(values, mask) == pytest.approx(pooled, rel=1e-6)
    assert abs(pooled - per_example) > 1e-3  # the test can tell the two averages apart
    # Other logits at the padded position change nothing.
    changed = LOGITS.clone()
    changed[1, 1] = torch.tensor([-4.0, 7.0, 0.5])
    ref = None if reference is None else reference.clone()
    values2, mask2 = fn(changed, LABELS, ref)
    assert pooled_mean(values2, mask2) == pytest.approx(pooled, rel=1e-6)
    # Split over two batches of different widths, TokenMean pools the same tokens.
    mean = TokenMean()
    mean.add(*fn(LOGITS[:1], LABELS[:1], None if reference is None else reference[:1]))
    mean.add(*fn(LOGITS[1:, :1], LABELS[1:, :1], None if reference is None else reference[1:, :1]))
    assert mean.value() == pytest.approx(pooled, rel=1e-6)


def test_loss_by_hand() -> None:
    check_token_metric(token_loss, (-math.log(P_A[1]), math.log(3), -math.log(P_C[0])))


def test_el2n_by_hand() -> None:
    a = math.sqrt(P_A[0] ** 2 + (P_A[1] - 1) ** 2 + P_A[2] ** 2)
    c = math.sqrt((P_C[0] - 1) ** 2 + P_C[1] ** 2 + P_C[2] ** 2)
    check_token_metric(token_el2n, (a, math.sqrt(2 / 3), c))


def test_logits_cos_by_hand() -> None:
    a = P_A[1] / math.sqrt(sum(p * p for p in P_A))
    c = P_C[0] / math.sqrt(sum(p * p for p in P_C))
    check_token_metric(token_logits_cos, (a, 1 / math.sqrt(3), c))


def test_kl_by_hand() -> None:
    # Reference P_t: token (0,0) uniform, token (0,1) (1/2, 1/4, 1/4), token (1,0) equal to p_s (KL 0).
    reference = torch.tensor([[[5.0, 5.0, 5.0], [math.log(2), 0.0, 0.0]],
                              [[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    a = sum((1 / 3) * math.log((1 / 3) / p) for p in P_A)
    b = 0.5 * math.log(0.5 / (1 / 3)) + 2 * 0.25 * math.log(0.25 / (1 / 3))
    check_token_metric(token_kl, (a, b, 0.0), reference)
    with pytest.raises(ValueError, match="reference"):
        token_kl(LOGITS, LABELS, None)


def test_grad_norm_by_hand() -> None:
    assert grad_norm([torch.tensor([3.0, 4.0]), torch.tensor([[12.0]])]) == 13.0
    assert grad_norm([]) == 0.0


def test_registry_directions_and_flags() -> None:
    assert {n: m.direction for n, m in METRICS.items()} == {
        "Loss": "lower", "KL": "lower", "EL2N": "lower", "LogitsCos": "higher", "LEEP": "higher", "LogME": "higher",
        "Arrow": "higher", "GradAlign": "higher", "GraNd": "lower"}
    assert [n for n, m in METRICS.items() if m.needs_reference] == ["KL"]
    assert [n for n, m in METRICS.items() if m.needs_grad] == ["GraNd"]
    assert {n: m.kind for n, m in METRICS.items() if m.kind != "token"} == {
        "LEEP": "answer", "LogME": "answer", "Arrow": "parameter", "GradAlign": "parameter", "GraNd": "grad"}
    assert [n for n in METRICS if not METRICS[n].applies_to("adapter")] == ["Arrow", "GradAlign"]
    assert [n for n in METRICS if not METRICS[n].applies_to("ia3")] == ["Arrow"]
    assert METRICS["Loss"].fn is token_loss and METRICS["LogitsCos"].fn is token_logits_cos
    assert METRICS["Loss"].similarity(2.0) == -2.0 and METRICS["LogitsCos"].similarity(0.3) == 0.3
    assert [m.name for m in resolve_metrics(["all"], "prefix")] == ["Loss", "KL", "EL2N", "LogitsCos", "LEEP", "LogME",
                                                                     "GraNd"]
    with pytest.raises(UserInputError, match="--metric Arrow: applies to lora modules, not to --delta ia3"):
        resolve_metrics(["Loss Arrow"], "ia3")
    assert [m.name for m in resolve_metrics(["GraNd,Loss", "GraNd"])] == ["GraNd", "Loss"]
    with pytest.raises(UserInputError, match="unknown metric 'loss'"):
        resolve_metrics(["loss"])


# --- GraNd on a tiny model ------------------------------------------------------------------------------


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """A stand-in for a tuned module: the current delta state plus seeded noise."""
    g = torch.Generator().manual_seed(seed)
    return {n: t + scale * torch.randn(t.shape, generator=g) for n, t in delta_state_dict(model).items()}


def tiny_with_delta(backbone_dir: Path, method: str):
    model, tokenizer = load_backbone(backbone_dir)
    torch.manual_seed(INIT_SEED)
    attach_delta(model, CONFIGS[method])
    return model, tokenizer


def dev_task(tokenizer, task: str = "sent_review", n: int = 4):
    examples = load_task(SUITE_DIR, task, 16, 100, ["dev"])["dev"][:n]
    return encode_examples(tokenizer, examples, 256, 32)


@pytest.mark.parametrize("method", ["lora", "prefix", "ia3"])
def test_grand_matches_manual_per_example_autograd(tiny_backbone_dir: Path, method: str) -> None:
    model, tokenizer = tiny_with_delta(tiny_backbone_dir, method)
    load_delta_state(model, perturbed(model, 1), "noise")
    task = dev_task(tokenizer)
    groups = delta_groups(model, "layer")
    params = dict(model.named_parameters())

    expected: dict[str, list[float]] = {g: [] for g in groups}
    for ids, outputs in zip(task.inputs, task.outputs):
        labels = torch.tensor([outputs[0]])
        logits = model(input_ids=torch.tensor([ids]), labels=labels).logits
        loss = F.cross_entropy(logits[0], labels[0])  # the example's mean token loss
        model.zero_grad(set_to_none=True)
        loss.backward()
        for g, names in groups.items():
            sq = sum(float((params[n].grad.double() ** 2).sum()) for n in names if params[n].grad is not None)
            expected[g].append(math.sqrt(sq))
    model.zero_grad(set_to_none=True)

    got = per_example_grad_norms(model, task, tokenizer.pad_token_id, groups)
    assert list(got) == list(groups)
    for g in groups:
        assert got[g] == pytest.approx(expected[g], rel=1e-5)
        assert all(v > 0 for v in got[g])
    # The scorer's GraNd per group is the mean over examples.
    scorer = SimilarityScorer(model, tokenizer.pad_token_id, delta_state_dict(model), "layer", batch_size=2)
    scores = scorer.score(task, delta_state_dict(model), [METRICS["GraNd"]])
    assert scores["GraNd"] == pytest.approx({g: sum(v) / len(v) for g, v in expected.items()}, rel=1e-5)


# --- score.py end to end ---------------------------------------------------------------------------------


def make_modules(backbone_dir: Path, root: Path, method: str, tasks: list[str], seed: int,
                 cfg: DeltaConfig | None = None) -> None:
    """Save a perturbed module per task under root/{task}, as tune.py's checkpoints would be."""
    cfg = cfg or CONFIGS[method]
    model, _ = load_backbone(backbone_dir)
    torch.manual_seed(INIT_SEED)
    attach_delta(model, cfg)
    for i, task in enumerate(tasks):
        save_delta_checkpoint(root / task, perturbed(model, seed + i), cfg, backbone_dir.name,
                              backbone_fingerprint(model), task=task)


@pytest.fixture(scope="module")
def modules(tiny_backbone_dir: Path, tmp_path_factory) -> Path:
    """root/{sources,random}/{method}/{task} for the three methods and TASKS."""
    root = tmp_path_factory.mktemp("modules")
    for method in CONFIGS:
        make_modules(tiny_backbone_dir, root / "sources" / method, method, TASKS, seed=10)
        make_modules(tiny_backbone_dir, root / "random" / method, method, TASKS, seed=20)
    return root


def cli_args(backbone_dir: Path, modules: Path, out: Path, method: str = "lora", metric: str = "Loss",
             tasks: list[str] = TASKS, extra: list[str] = ()) -> list[str]:
    return ["--delta", method, "--metric", *metric.split(), "--tasks", *tasks,
            "--source_ckpt_path", str(modules / "sources" / method),
            "--random_tuned_ckpt_path", str(modules / "random" / method),
            "--model", str(backbone_dir), "--task_dir", str(SUITE_DIR), "--max_examples", "4",
            "--batch_size", "3", "--output_dir", str(out), "--device", "cpu", "--quiet", *extra]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        assert reader.fieldnames == ["target", "source", "metric", "group", "score"]
        return list(reader)


def test_cli_rows_are_targets_x_other_sources_x_metrics(tiny_backbone_dir: Path, modules: Path,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "sim"
    assert score_cli.main(cli_args(tiny_backbone_dir, modules, out, metric="all")) == 0
    rows = read_rows(out / "result.tsv")
    keys = [(r["target"], r["source"], r["metric"], r["group"]) for r in rows]
    expected = [(t, s, m, "model") for t in TASKS for s in TASKS if s != t
                for m in ["Loss", "KL", "EL2N", "LogitsCos", "LEEP", "LogME", "Arrow", "GradAlign", "GraNd"]]
    assert keys == expected
    assert all(r["target"] != r["source"] for r in rows)
    assert all(math.isfinite(float(r["score"])) for r in rows)
    written = sorted(p.name for p in out.iterdir() if p.name != ".result.tsv.lock")
    assert written == ["result.tsv", "score_settings.json"]


def test_cli_loss_equals_independent_pooled_loss(tiny_backbone_dir: Path, modules: Path, tmp_path: Path) -> None:
    """Model-granularity Loss is the source's pooled token loss; a layer group's Loss has the rest at init."""
    out = tmp_path / "sim"
    args = cli_args(tiny_backbone_dir, modules, out, tasks=["sent_review", "sent_tweet"], extra=["--granularity",
                                                                                                "layer"])
    assert score_cli.main(args) == 0
    got = {(r["target"], r["source"], r["group"]): float(r["score"]) for r in read_rows(out / "result.tsv")}

    model, tokenizer = tiny_with_delta(tiny_backbone_dir, "lora")
    init = delta_state_dict(model)
    source, _ = load_delta_checkpoint(modules / "sources" / "lora" / "sent_tweet")
    task = dev_task(tokenizer, "sent_review")
    group = "decoder.1"
    state = {n: (source[n] if param_group(n, "layer") == group else t) for n, t in init.items()}
    assert any(torch.equal(state[n], source[n]) and not torch.equal(state[n], init[n]) for n in state)
    assert any(torch.equal(state[n], init[n]) and not torch.equal(state[n], source[n]) for n in state)
    load_delta_state(model, state, "decoder.1 only")
    total, count = 0.0, 0
    with torch.no_grad():
        for _, batch in first_output_batches(model, task, 1, tokenizer.pad_token_id):
            logits = model(**batch).logits
            total += float(F.cross_entropy(logits[0], batch["labels"][0], reduction="sum"))
            count += int((batch["labels"] != -100).sum())
    assert got[("sent_review", "sent_tweet", group)] == pytest.approx(total / count, rel=1e-5)
    groups = {g for (t, s, g) in got if (t, s) == ("sent_review", "sent_tweet")}
    assert groups == {"encoder.0", "encoder.1", "decoder.0", "decoder.1"}


def test_cli_kl_equals_a_hand_computed_kl_to_the_reference_module(tiny_backbone_dir: Path, modules: Path,
                                                                  tmp_path: Path) -> None:
    """KL end to end: the reference distribution P_t from the target's random-init tuned module, the source's p_s,
    Σ_v P_t(v) (log P_t(v) - log p_s(v)) written out per answer token and pooled over the tokens."""
    out = tmp_path / "sim"
    args = cli_args(tiny_backbone_dir, modules, out, metric="KL", tasks=["sent_review", "sent_tweet"])
    assert score_cli.main(args) == 0
    got = {(r["target"], r["source"]): float(r["score"]) for r in read_rows(out / "result.tsv")}
    model, tokenizer = tiny_with_delta(tiny_backbone_dir, "lora")
    task = dev_task(tokenizer, "sent_review")
    reference, _ = load_delta_checkpoint(modules / "random" / "lora" / "sent_review")
    source, _ = load_delta_checkpoint(modules / "sources" / "lora" / "sent_tweet")
    total, count = 0.0, 0
    with torch.no_grad():
        for _, batch in first_output_batches(model, task, 1, tokenizer.pad_token_id):
            load_delta_state(model, reference, "reference")
            p_ref = torch.softmax(model(**batch).logits[0].double(), -1)
            load_delta_state(model, source, "source")
            p_src = torch.softmax(model(**batch).logits[0].double(), -1)
            answer = batch["labels"][0] != -100
            per_token = (p_ref * (p_ref.log() - p_src.log())).sum(-1)
            total += float(per_token[answer].sum())
            count += int(answer.sum())
    assert count > 0 and total > 0  # the two modules disagree: a KL of 0 would check nothing
    assert got[("sent_review", "sent_tweet")] == pytest.approx(total / count, rel=1e-4)


def test_layer_granularity_one_row_per_group(tiny_backbone_dir: Path, modules: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim"
    args = cli_args(tiny_backbone_dir, modules, out, method="prefix", metric="Loss GraNd",
                    tasks=["sent_review"], extra=["--source_tasks", *TASKS, "--granularity", "layer"])
    assert score_cli.main(args) == 0
    rows = read_rows(out / "result.tsv")
    layers = ["encoder.prefix", "decoder.self_prefix", "decoder.cross_prefix"]
    assert [(r["source"], r["metric"], r["group"]) for r in rows] == [
        (s, m, g) for s in ["sent_tweet", "topic_news"] for m in ["Loss", "GraNd"] for g in layers]
    # GraNd's groups split each example's gradient: per example sqrt(sum of squared group norms) is the
    # whole norm, so after averaging over examples (triangle inequality) sqrt(Σ p²) <= whole <= Σ p.
    model_out = tmp_path / "sim_model"
    args = cli_args(tiny_backbone_dir, modules, model_out, method="prefix", metric="GraNd",
                    tasks=["sent_review"], extra=["--source_tasks", "sent_tweet"])
    assert score_cli.main(args) == 0
    whole = float(read_rows(model_out / "result.tsv")[0]["score"])
    parts = [float(r["score"]) for r in rows if r["source"] == "sent_tweet" and r["metric"] == "GraNd"]
    assert len(parts) == 3 and all(p > 0 for p in parts)
    assert math.sqrt(sum(p * p for p in parts)) <= whole * (1 + 1e-6) and whole <= sum(parts) * (1 + 1e-6)


@pytest.mark.parametrize("method", ["adapter", "prefix"])
def test_swapping_sources_equals_scoring_each_alone(tiny_backbone_dir: Path, modules: Path, tmp_path: Path,
                                                    method: str) -> None:
    together = tmp_path / "together"
    metric = "Loss KL EL2N LogitsCos GraNd"
    # one at a time (--group_size 1): swapping alone must change nothing, to the last digit; scoring them in
    # one group is tests/test_grouped.py's
    args = cli_args(tiny_backbone_dir, modules, together, method=method, metric=metric, tasks=["topic_news"],
                    extra=["--source_tasks", *TASKS, "--granularity", "block", "--group_size", "1"])
    assert score_cli.main(args) == 0
    joint = read_rows(together / "result.tsv")
    alone = []
    for source in ["sent_tweet", "sent_review"]:  # the other order, one fresh backbone each
        out = tmp_path / source
        args = cli_args(tiny_backbone_dir, modules, out, method=method, metric=metric, tasks=["topic_news"],
                        extra=["--source_tasks", source, "--granularity", "block"])
        assert score_cli.main(args) == 0
        alone += read_rows(out / "result.tsv")
    assert len(joint) == 2 * 5 * 2
    assert sorted(map(tuple, (r.values() for r in joint))) == sorted(map(tuple, (r.values() for r in alone)))
    # Different sources do get different scores (the comparison above is not vacuous).
    loss = {r["source"]: r["score"] for r in joint if r["metric"] == "Loss" and r["group"] == "encoder"}
    assert loss["sent_review"] != loss["sent_tweet"]


def test_leave_one_out_with_explicit_sources(tiny_backbone_dir: Path, modules: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim"
    args = cli_args(tiny_backbone_dir, modules, out, tasks=["sent_review", "sent_tweet"],
                    extra=["--source_tasks", "sent_review", "topic_news"])
    assert score_cli.main(args) == 0
    pairs = [(r["target"], r["source"]) for r in read_rows(out / "result.tsv")]
    assert pairs == [("sent_review", "topic_news"), ("sent_tweet", "sent_review"), ("sent_tweet", "topic_news")]
    # A target whose only source is itself is refused.
    args = cli_args(tiny_backbone_dir, modules, tmp_path / "none", tasks=["sent_review"],
                    extra=["--source_tasks", "sent_review"])
    with pytest.raises(UserInputError, match="no source other than itself"):
        score_cli.main(args)


def expect_refusal(args: list[str], out: Path, capsys, *fragments: str) -> None:
    assert run_cli(score_cli.main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ")
    for fragment in fragments:
        assert fragment in err[-1]
    assert not out.exists()


def test_bad_inputs_exit_2_and_write_nothing(tiny_backbone_dir: Path, modules: Path, tmp_path: Path,
                                             capsys) -> None:
    out = tmp_path / "sim"
    # A missing source checkpoint.
    expect_refusal(cli_args(tiny_backbone_dir, modules, out, tasks=["sent_review", "sent_satisfied"]), out, capsys,
                   "--source_ckpt_path", "sent_satisfied")
    # A source with other sizes, named in the message.
    odd = tmp_path / "odd"
    make_modules(tiny_backbone_dir, odd, "lora", ["sent_review", "sent_tweet"], seed=1)
    make_modules(tiny_backbone_dir, odd, "lora", ["topic_news"], seed=1, cfg=DeltaConfig("lora", lora_r=2))
    args = cli_args(tiny_backbone_dir, modules, out)
    args[args.index("--source_ckpt_path") + 1] = str(odd)
    expect_refusal(args, out, capsys, str(odd / "topic_news"), "lora_r=2")
    # --delta that is not the sources' method.
    args = cli_args(tiny_backbone_dir, modules, out)
    args[args.index("--delta") + 1] = "adapter"
    expect_refusal(args, out, capsys, "--delta adapter", "lora")
    # KL without the reference modules.
    args = cli_args(tiny_backbone_dir, modules, out, metric="Loss KL")
    i = args.index("--random_tuned_ckpt_path")
    expect_refusal(args[:i] + args[i + 2:], out, capsys, "--random_tuned_ckpt_path", "KL")
    # A missing reference module.
    args = cli_args(tiny_backbone_dir, modules, out, metric="KL")
    args[args.index("--random_tuned_ckpt_path") + 1] = str(tmp_path / "nowhere")
    expect_refusal(args, out, capsys, "--random_tuned_ckpt_path", "nowhere")
    # An unknown metric, an unknown target task.
    expect_refusal(cli_args(tiny_backbone_dir, modules, out, metric="Loss Perplexity"), out, capsys,
                   "--metric", "Perplexity")
    expect_refusal(cli_args(tiny_backbone_dir, modules, out, tasks=["sent_reviews"]), out, capsys, "sent_reviews")


@pytest.mark.slow
def test_script_entry_points(tiny_backbone_dir: Path, modules: Path, tmp_path: Path) -> None:
    """`python get_similarity/score.py` works from the repo root; the shell scripts pass the right flags."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = tmp_path / "sim"
    proc = subprocess.run([sys.executable, "get_similarity/score.py", *cli_args(
        tiny_backbone_dir, modules, out, tasks=["sent_review", "sent_tweet"])], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(read_rows(out / "result.tsv")) == 2

    scripts = REPO / "scripts" / "get_similarity"
    for method in ("adapter", "lora", "prefix"):
        for metric in ("Loss", "KL", "EL2N", "LogitsCos", "GraNd"):
            proc = subprocess.run(["bash", str(scripts / f"{method}_{metric}.sh")], env={**env, "DRY_RUN": "1"},
                                  capture_output=True, text=True, timeout=60, check=True)
            words = proc.stdout.split()
            assert words[words.index("--delta") + 1] == method and words[words.index("--metric") + 1] == metric
            assert words[words.index("--source_ckpt_path") + 1] == f"runs/sources/{method}"
            assert words[words.index("--random_tuned_ckpt_path") + 1] == f"runs/random/{method}"
    # Environment overrides reach the command; a real run through run.sh.
    overrides = {"MODEL": str(tiny_backbone_dir), "TASKS": "sent_review topic_news", "DEVICE": "cpu",
                 "SOURCE_CKPT_PATH": str(modules / "sources" / "lora"), "MAX_EXAMPLES": "3",
                 "GRANULARITY": "block", "OUTPUT_DIR": str(tmp_path / "via_script"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(scripts / "lora_EL2N.sh")], env={**env, **overrides},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_rows(tmp_path / "via_script" / "result.tsv")
    # the sources default to the modules of SOURCE_CKPT_PATH (its subfolders here, having no result.tsv)
    assert [(r["target"], r["source"], r["metric"], r["group"]) for r in rows] == [
        (t, s, "EL2N", g) for t, s in [("sent_review", "sent_tweet"), ("sent_review", "topic_news"),
                                       ("topic_news", "sent_review"), ("topic_news", "sent_tweet")]
        for g in ("encoder", "decoder")]


def test_runs_update_one_result_file(tiny_backbone_dir: Path, modules: Path, tmp_path: Path, capsys) -> None:
    """A second run adds its metric's rows; a rerun is refused, and with --overwrite replaces its own rows; rows
    scored with other settings (fewer examples) never join the table, --overwrite or not."""
    out = tmp_path / "sim"
    two = ["sent_review", "sent_tweet"]
    assert score_cli.main(cli_args(tiny_backbone_dir, modules, out, metric="Loss", tasks=two)) == 0
    assert score_cli.main(cli_args(tiny_backbone_dir, modules, out, metric="EL2N", tasks=two)) == 0
    first = read_rows(out / "result.tsv")
    assert [(r["target"], r["metric"]) for r in first] == [
        ("sent_review", "Loss"), ("sent_tweet", "Loss"), ("sent_review", "EL2N"), ("sent_tweet", "EL2N")]
    args = cli_args(tiny_backbone_dir, modules, out, metric="Loss", tasks=two)
    capsys.readouterr()
    assert run_cli(score_cli.main, args) == 2  # its rows are there already
    assert "result.tsv:2: already holds the score of (target=sent_review" in capsys.readouterr().err
    fewer = list(args)
    fewer[fewer.index("--max_examples") + 1] = "2"
    for extra in ([], ["--overwrite"]):
        assert run_cli(score_cli.main, [*fewer, *extra]) == 2
        assert "scored with max_examples=4, this run asks max_examples=2" in capsys.readouterr().err
    assert read_rows(out / "result.tsv") == first
    assert score_cli.main([*args, "--overwrite"]) == 0
    second = read_rows(out / "result.tsv")
    assert second[:2] == first[2:]  # the rows it replaces go last, with the same (deterministic) scores
    assert second[2:] == first[:2]
    # A malformed result.tsv is refused before scoring and left untouched.
    (out / "result.tsv").write_text("target\tsource\tscore\nsent_review\tsent_tweet\t1.0\n")
    assert run_cli(score_cli.main, cli_args(tiny_backbone_dir, modules, out, tasks=two)) == 2
    assert "result.tsv:1: expected the header" in capsys.readouterr().err
    assert (out / "result.tsv").read_text() == "target\tsource\tscore\nsent_review\tsent_tweet\t1.0\n"


# --- one module in memory at a time --------------------------------------------------------------------


def test_one_module_held_at_a_time(tiny_backbone_dir: Path, modules: Path, tmp_path: Path, monkeypatch) -> None:
    """Every module is checked before any is read; then each is read when scored and freed before the next read."""
    events: list[tuple[str, str]] = []  # (what, "sources/task" or "random/task") in call order
    reads: list[tuple[str, list[weakref.ref]]] = []  # per read: the module and weak references to its tensors

    def name(folder: Path) -> str:
        return f"{Path(folder).parent.parent.name}/{Path(folder).name}"

    def live() -> list[str]:
        return [m for m, refs in reads if any(r() is not None for r in refs)]

    def counting_inspect(folder: Path):
        events.append(("inspect", name(folder)))
        return inspect_delta_checkpoint(folder)

    def counting_load(folder: Path):
        assert live() == [], f"{name(folder)} read while {live()} still held"
        tensors, meta = load_delta_checkpoint(folder)
        reads.append((name(folder), [weakref.ref(t) for t in tensors.values()]))
        events.append(("read", name(folder)))
        return tensors, meta

    real_score, real_reference = SimilarityScorer.score, SimilarityScorer.reference

    def counting_score(self, task, tensors, *args, **kwargs):
        events.append(("score", "+".join(live())))
        return real_score(self, task, tensors, *args, **kwargs)

    def counting_reference(self, task, tensors, source):
        events.append(("reference", "+".join(live())))
        return real_reference(self, task, tensors, source)

    monkeypatch.setattr(scoring, "inspect_delta_checkpoint", counting_inspect)
    monkeypatch.setattr(scoring, "load_delta_checkpoint", counting_load)
    monkeypatch.setattr(SimilarityScorer, "score", counting_score)
    monkeypatch.setattr(SimilarityScorer, "reference", counting_reference)
    out = tmp_path / "sim"
    args = cli_args(tiny_backbone_dir, modules, out, metric="Loss KL",
                    extra=["--granularity", "block", "--group_size", "1"])  # a group holds G modules' tensors
    assert score_cli.main(args) == 0

    expected = [("inspect", f"sources/{t}") for t in TASKS] + [("inspect", f"random/{t}") for t in TASKS]
    for t in TASKS:
        expected += [("read", f"random/{t}"), ("reference", f"random/{t}")]
        for s in TASKS:
            if s != t:
                expected += [("read", f"sources/{s}"), ("score", f"sources/{s}")]
    assert events == expected
    assert live() == []
    assert len(read_rows(out / "result.tsv")) == 3 * 2 * 2 * 2  # targets x sources x metrics x blocks


def test_sources_checked_from_headers_before_any_read(tiny_backbone_dir: Path, modules: Path, tmp_path: Path,
                                                      monkeypatch, capsys) -> None:
    """A source whose tensor names do not fit is refused from its header alone: no tensors read, nothing written."""
    src = tmp_path / "sources"
    make_modules(tiny_backbone_dir, src, "lora", TASKS, seed=10)
    tensors, meta = load_delta_checkpoint(src / "topic_news")
    first = sorted(tensors)[0]
    tensors["renamed." + first] = tensors.pop(first)
    cfg = DeltaConfig.from_checkpoint_meta(meta)
    save_delta_checkpoint(src / "topic_news", tensors, cfg, meta["backbone"], meta["backbone_fingerprint"],
                          task="topic_news")
    # The header gives what a full read gives.
    shapes, header_meta = inspect_delta_checkpoint(src / "topic_news")
    assert header_meta == meta
    assert shapes == {n: tuple(t.shape) for n, t in tensors.items()}

    def no_read(folder: Path):
        raise AssertionError(f"{folder}: tensors read before every source was checked")

    monkeypatch.setattr(scoring, "load_delta_checkpoint", no_read)
    out = tmp_path / "sim"
    args = cli_args(tiny_backbone_dir, modules, out)
    args[args.index("--source_ckpt_path") + 1] = str(src)
    expect_refusal(args, out, capsys, str(src / "topic_news"), "1 missing keys",
                   f"1 unexpected keys (e.g. renamed.{first})")
