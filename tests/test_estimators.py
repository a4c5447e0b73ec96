"""The transferability estimators: LEEP and Arrow by hand, LogME against its evidence maximised by scipy, the
gradient probe against finite differences of the real loss, and the two-stage retrieval end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.stats import multivariate_normal

from get_similarity import estimators
from get_similarity import score as score_cli
from get_similarity.metrics import METRICS, AnswerOutputs
from get_similarity.scoring import SimilarityScorer, TargetContext
from models.delta import delta_state_dict, load_delta_state
from models.examples import first_output_batches
from tests.test_similarity import (
    CONFIGS,
    TASKS,
    cli_args,
    dev_task,
    make_modules,
    perturbed,
    read_rows,
    tiny_with_delta,
)
from utils.errors import run_cli

# --- LEEP -------------------------------------------------------------------------------------------------


def test_leep_by_hand() -> None:
    """Three examples, two dummy labels: the empirical joint, the conditional and the mean log-likelihood."""
    theta = [[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]
    labels = ["a", "b", "a"]
    joint = {"a": [(0.8 + 0.6) / 3, (0.2 + 0.4) / 3], "b": [0.3 / 3, 0.7 / 3]}
    marginal = [joint["a"][z] + joint["b"][z] for z in range(2)]
    expected = sum(math.log(sum(joint[y][z] / marginal[z] * th[z] for z in range(2)))
                   for th, y in zip(theta, labels)) / 3
    logp = torch.tensor(theta, dtype=torch.float64).log()
    assert estimators.leep(logp, labels) == pytest.approx(expected, rel=1e-12)
    # Label-agnostic: renaming the dummy labels (columns) or the target's labels changes nothing.
    assert estimators.leep(logp[:, [1, 0]], labels) == pytest.approx(expected, rel=1e-12)
    assert estimators.leep(logp, ["yes", "no", "yes"]) == pytest.approx(expected, rel=1e-12)
    # A first token that separates the labels exactly (whatever words it uses) reaches LEEP's maximum, 0.
    separating = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]).clamp_min(1e-30).log()
    assert estimators.leep(separating, labels) == pytest.approx(0.0, abs=1e-9)
    assert estimators.leep(separating, labels) > estimators.leep(logp, labels)


# --- LogME ------------------------------------------------------------------------------------------------


def scipy_max_evidence(f: np.ndarray, y: np.ndarray) -> float:
    """max over (α, β) of log N(y; 0, FFᵀ/α + I/β), the evidence LogME maximises, by a generic optimiser."""
    n = len(y)

    def negative(log_ab: np.ndarray) -> float:
        alpha, beta = np.exp(log_ab)
        return -multivariate_normal.logpdf(y, np.zeros(n), f @ f.T / alpha + np.eye(n) / beta)

    best = min((minimize(negative, start, method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12,
                                                                         "maxiter": 4000})
                for start in ([0.0, 0.0], [2.0, -1.0], [-2.0, 2.0])), key=lambda r: r.fun)
    return -best.fun


@pytest.mark.parametrize("n, d", [(12, 5), (6, 10)])  # more examples than features, and fewer
def test_logme_is_the_maximised_evidence(n: int, d: int) -> None:
    rng = np.random.default_rng(n * d)
    f = rng.normal(size=(n, d))
    labels = [i % 3 for i in range(n)]
    per_class = []
    for c in range(3):
        y = np.array([float(label == c) for label in labels])
        value, alpha, beta = estimators.column_evidence(torch.tensor(f), torch.tensor(y))
        oracle = scipy_max_evidence(f, y) / n
        assert value == pytest.approx(oracle, abs=1e-6)
        # The fixed point's (α, β) give the evidence the closed form claims.
        direct = multivariate_normal.logpdf(y, np.zeros(n), f @ f.T / alpha + np.eye(n) / beta) / n
        assert value == pytest.approx(direct, abs=1e-7)
        per_class.append(value)
    assert estimators.logme(torch.tensor(f), labels) == pytest.approx(sum(per_class) / 3, abs=1e-12)


def test_logme_at_the_edges() -> None:
    """With more feature dimensions than examples (the demo has 16 and 128) the updates can leave every finite
    (α, β): to β → ∞ when the features fit y exactly, to α → ∞ when they explain it no better than noise. The value
    is then the supremum on that edge in closed form, which no finite (α, β) exceeds."""
    rng = np.random.default_rng(0)
    y = np.array([float(i % 4 == 0) for i in range(16)])
    f = rng.normal(size=(16, 128)) * 0.05
    f[:, 0] += 3 * y  # one dimension carries the label
    value, alpha, beta = estimators.column_evidence(torch.tensor(f), torch.tensor(y))
    gram = f @ f.T
    assert beta == math.inf and alpha == pytest.approx(16 / (y @ np.linalg.solve(gram, y)), rel=1e-9)
    assert value == pytest.approx(multivariate_normal.logpdf(y, np.zeros(16), gram / alpha) / 16, abs=1e-9)
    assert value >= scipy_max_evidence(f, y) / 16 - 1e-6
    noise = np.random.default_rng(1).normal(size=(16, 128))
    value, alpha, beta = estimators.column_evidence(torch.tensor(noise), torch.tensor(y))
    assert alpha == math.inf and beta == pytest.approx(16 / (y @ y))
    assert value == pytest.approx(multivariate_normal.logpdf(y, np.zeros(16), np.eye(16) / beta) / 16, abs=1e-9)
    assert value >= scipy_max_evidence(noise, y) / 16 - 1e-6


def test_logme_prefers_features_that_separate_the_labels() -> None:
    rng = np.random.default_rng(0)
    labels = [i % 2 for i in range(40)]
    noise = rng.normal(size=(40, 4))
    informative = noise.copy()
    informative[:, 0] += 3.0 * np.array(labels)
    assert estimators.logme(torch.tensor(informative), labels) > estimators.logme(torch.tensor(noise), labels)
    outputs = AnswerOutputs(torch.zeros(40, 3), torch.tensor(noise), labels, has_classes=False)
    assert METRICS["LogME"].fn(outputs) is None  # no classes: unknown, not a number


# --- Arrow and gradient alignment ----------------------------------------------------------------------


def test_top_directions_match_the_svd_of_the_product() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 4, 9, generator=g, dtype=torch.float64), torch.randn(5, 7, 4, generator=g,
                                                                               dtype=torch.float64)
    v = estimators.top_directions(a, b)
    for p in range(5):
        _, _, vh = torch.linalg.svd(b[p] @ a[p])
        assert abs(float(v[p] @ vh[0])) == pytest.approx(1.0, abs=1e-9)  # the same line, either sign


def test_arrow_by_hand() -> None:
    """ΔW = b aᵀ with a along e1: tokens e1 (cos 1), e2 (cos 0) and (e1 + e2)/√2 (cos 1/√2)."""
    a = torch.tensor([[2.0, 0.0, 0.0]])  # (r=1, in=3)
    b = torch.tensor([[1.0], [3.0]])  # (out=2, r=1)
    tokens = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.2, 0.0], [1.0, 1.0, 0.0]])
    moments = {"p": estimators.input_second_moment(tokens)}
    expected = math.sqrt((1.0 + 0.0 + 0.5) / 3)
    assert estimators.arrow_alignment(moments, {"p": estimators.Update(a=a, b=b, scale=4.0)}) == pytest.approx(
        expected, rel=1e-12)
    # Two parts: the mean of their alignments; a part along e3 sees none of these tokens.
    other = estimators.Update(a=torch.tensor([[0.0, 0.0, 1.0]]), b=b)
    both = estimators.arrow_alignment({"p": moments["p"], "q": moments["p"]},
                                      {"p": estimators.Update(a=a, b=b), "q": other})
    assert both == pytest.approx(expected / 2, rel=1e-12)


def test_gradient_alignment_by_hand() -> None:
    g = torch.Generator().manual_seed(1)
    a, b, grad, vec, vec_grad = (torch.randn(*shape, generator=g, dtype=torch.float64)
                                 for shape in ((3, 6), (5, 3), (5, 6), (4,), (4,)))
    updates = {"pair": estimators.Update(a=a, b=b, scale=0.5), "vec": estimators.Update(tensor=vec)}
    dense = torch.cat([(b @ a * 0.5).flatten(), vec]).double()
    gradient = torch.cat([grad.flatten(), vec_grad]).double()
    expected = float(-gradient @ dense / (gradient.norm() * dense.norm()))
    assert estimators.gradient_alignment({"pair": grad, "vec": vec_grad}, updates) == pytest.approx(expected, rel=1e-9)
    assert estimators.gradient_alignment({"vec": vec_grad}, {"vec": estimators.Update(tensor=-vec_grad)}) == \
        pytest.approx(1.0)
    assert estimators.gradient_alignment({"vec": vec_grad}, {"vec": estimators.Update(tensor=0 * vec)}) == 0.0


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_gradient_probe_is_the_directional_derivative_of_the_loss(tiny_backbone_dir: Path, method: str) -> None:
    """⟨∇L, τ⟩ from the probe equals d/dε L(neutral + ε τ) at 0, by central differences on the real model."""
    model, tokenizer = tiny_with_delta(tiny_backbone_dir, method)
    model.eval()
    init = delta_state_dict(model)
    scorer = SimilarityScorer(model, tokenizer.pad_token_id, init, "model", batch_size=3, cfg=CONFIGS[method])
    task = dev_task(tokenizer)
    gradient = scorer.probes(task, [METRICS["GradAlign"]])["gradient"]
    source = perturbed(model, seed=5, scale=0.2)
    spec = CONFIGS[method].spec
    neutral = spec.neutral_state(init)
    updates = scorer.updates(source)
    derivative = sum(u.inner(gradient[k]) for k, u in updates.items())

    def loss_at(eps: float) -> float:
        if method == "lora":  # B scaled by ε: ΔW = ε·B_s·A_s·scale, the ray along the source's ΔW
            state = {k: (v * eps if k.endswith("lora_B") else v) for k, v in source.items()}
        else:  # the scale vectors along τ = θ_s - 1
            state = {k: neutral[k] + eps * (source[k] - neutral[k]) for k in source}
        load_delta_state(model, state, "ray")
        total, tokens = 0.0, 0
        with torch.no_grad():
            for _, batch in first_output_batches(model, task, 3, tokenizer.pad_token_id):
                logits = scorer.family.answer_logits(model, batch)
                total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                                                                 batch["labels"].reshape(-1), reduction="sum"))
                tokens += int((batch["labels"] != -100).sum())
        return total / tokens

    eps = 1e-3
    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert derivative == pytest.approx(numeric, rel=2e-3, abs=1e-6)
    assert abs(derivative) > 1e-4  # the check is not 0 = 0


def test_grouped_scores_equal_one_at_a_time(family_backbone_dir: Path) -> None:
    """LEEP, LogME and the parameter-space metrics of a group of sources scored in one pass equal each alone, on
    both backbone families (the features are the output layer's input, aligned as the logits are)."""
    model, tokenizer = tiny_with_delta(family_backbone_dir, "lora")
    model.eval()
    init = delta_state_dict(model)
    scorer = SimilarityScorer(model, tokenizer.pad_token_id, init, "block", batch_size=3, cfg=CONFIGS["lora"])
    task = dev_task(tokenizer, n=6)
    metrics = [METRICS[n] for n in ("LEEP", "LogME", "Arrow", "GradAlign", "Loss")]
    context = TargetContext(True, scorer.probes(task, metrics))
    sources = [(perturbed(model, seed=s), f"s{s}") for s in (1, 2, 3)]
    together = scorer.score_group(task, sources, metrics, context=context)
    for (tensors, name), scores in zip(sources, together):
        alone = scorer.score(task, tensors, metrics, name, context=context)
        assert alone.keys() == scores.keys()
        for metric in alone:
            assert set(alone[metric]) == set(scorer.groups)
            for group, value in alone[metric].items():
                assert scores[metric][group] == pytest.approx(value, rel=1e-4, abs=1e-6)


# --- the command line: applicability and the two-stage retrieval ----------------------------------------


def test_two_stage_retrieval_scores_the_top_k_only(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    sources = [*TASKS, "topic_places", "nli_support"]
    root = tmp_path / "modules"
    make_modules(tiny_backbone_dir, root / "sources" / "lora", "lora", sources, seed=30)
    out = tmp_path / "sim"
    args = cli_args(tiny_backbone_dir, root, out, metric="Loss LEEP", tasks=["sent_review"],
                    extra=["--source_tasks", *sources, "--prefilter", "Arrow", "--prefilter_top", "2"])
    assert score_cli.main(args) == 0
    rows = read_rows(out / "result.tsv")
    arrow = {r["source"]: float(r["score"]) for r in rows if r["metric"] == "Arrow"}
    assert sorted(arrow) == sorted(s for s in sources if s != "sent_review")  # every source ranked
    top = sorted(arrow, key=lambda s: -arrow[s])[:2]
    for metric in ("Loss", "LEEP"):
        assert sorted(r["source"] for r in rows if r["metric"] == metric) == sorted(top)
    # The retrieval is part of the table's identity.
    settings = json.loads((out / "score_settings.json").read_text())
    assert settings["prefilter"] == "Arrow" and settings["prefilter_top"] == 2


@pytest.mark.parametrize("extra, message", [
    (["--metric", "Arrow", "--delta", "ia3"], "--metric Arrow: applies to lora modules, not to --delta ia3"),
    (["--prefilter", "Loss"], "--prefilter Loss: expected a metric that runs no forward pass per source"),
    (["--prefilter", "Arrow", "--prefilter_top", "0"], "--prefilter_top"),
])
def test_bad_estimator_flags_exit_2_in_one_line(tiny_backbone_dir: Path, tmp_path: Path, capsys, extra: list[str],
                                                message: str) -> None:
    root = tmp_path / "modules"
    make_modules(tiny_backbone_dir, root / "sources" / "lora", "lora", TASKS, seed=30)
    out = tmp_path / "sim"
    args = cli_args(tiny_backbone_dir, root, out) + extra
    assert run_cli(score_cli.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not out.exists()
