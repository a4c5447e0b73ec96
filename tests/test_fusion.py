"""Weighted fusion of source modules: weights, exact fusion, LoRA delta_w, granularity, the five scripts."""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.backbone import backbone_name, load_backbone
from models.delta import (
    DeltaConfig,
    attach_delta,
    backbone_fingerprint,
    delta_state_dict,
    load_delta_state,
    param_group,
    save_delta_checkpoint,
)
from models.formats import load_delta_checkpoint
from task_list import MANUAL_CATEGORIES
from tests.conftest import only_run
from unit_model import (
    merging,
    sources,
    unit_model_average,
    unit_model_cos,
    unit_model_Euclidean,
    unit_model_others,
    unit_model_Performance,
)
from unit_model.weightings import base as weighting_base
from unit_model.weightings import cos as weighting_cos
from unit_model.weightings import euclidean as weighting_euclidean
from unit_model.weightings import similarity as weighting_similarity
from utils.errors import UserInputError, run_cli

REPO = Path(__file__).resolve().parent.parent
TASKS = ["sent_review", "sent_tweet", "topic_news", "topic_places"]
# Each target's most similar source in the fixtures below (the other task of its category).
FRIEND = {"sent_review": "sent_tweet", "sent_tweet": "sent_review", "topic_news": "topic_places",
          "topic_places": "topic_news"}
LORA = DeltaConfig("lora", lora_r=4, lora_alpha=8)


# --------------------------------------------------------------------------------------------------
# Weights


def test_softmax_direction_and_exact_formula() -> None:
    scores = {"a": 1.0, "b": 3.0, "c": 2.0}
    low = weighting_base.softmax_weights(scores, "lower", 2.0)
    z = math.exp(-0.5) + math.exp(-1.5) + math.exp(-1.0)
    assert low == pytest.approx({"a": math.exp(-0.5) / z, "b": math.exp(-1.5) / z, "c": math.exp(-1.0) / z})
    assert max(low, key=low.get) == "a"  # lower score = more similar
    high = weighting_base.softmax_weights(scores, "higher", 2.0)
    assert max(high, key=high.get) == "b"
    assert high["a"] == pytest.approx(low["b"])  # negating the scores mirrors the weights
    assert math.fsum(low.values()) == pytest.approx(1.0) and math.fsum(high.values()) == pytest.approx(1.0)


def test_zscore_and_rank_norms_by_hand() -> None:
    """Losses 1, 2, 6 (lower = more similar): signed -1, -2, -6, mean -3, population std sqrt(14/3)."""
    scores = {"a": 1.0, "b": 2.0, "c": 6.0}
    std = math.sqrt(((2**2) + 1**2 + 3**2) / 3)
    z = weighting_base.comparable_scores({s: -v for s, v in scores.items()}, "zscore")
    assert z == pytest.approx({"a": 2 / std, "b": 1 / std, "c": -3 / std})
    w = weighting_base.softmax_weights(scores, "lower", 0.5, norm="zscore")
    e = {s: math.exp(v / 0.5) for s, v in z.items()}
    assert w == pytest.approx({s: v / sum(e.values()) for s, v in e.items()})
    # rank: ranks 3, 2, 1 of the signed scores, z-scored: sqrt(3/2), 0, -sqrt(3/2) (outliers do not matter)
    assert weighting_base.comparable_scores({"a": -1.0, "b": -2.0, "c": -600.0}, "rank") == pytest.approx(
        {"a": math.sqrt(1.5), "b": 0.0, "c": -math.sqrt(1.5)})
    # a metric on another scale gives the same weights under zscore: one temperature for every method
    assert weighting_base.softmax_weights({s: 1000 * v + 7 for s, v in scores.items()}, "lower", 0.5,
                                      norm="zscore") == pytest.approx(w)
    assert weighting_base.softmax_weights(scores, "lower", 0.5, norm="none") == weighting_base.softmax_weights(
        scores, "lower", 0.5)
    tie = weighting_base.softmax_weights({"a": 3.0, "b": 3.0}, "higher", 1.0, norm="zscore")
    assert tie == {"a": 0.5, "b": 0.5}
    with pytest.raises(UserInputError, match="--weight_norm"):
        weighting_base.softmax_weights(scores, "lower", 1.0, norm="softmax")


def test_effective_sources_is_exp_entropy() -> None:
    assert weighting_base.effective_sources([0.25] * 4) == pytest.approx(4.0)
    assert weighting_base.effective_sources([1.0, 0.0, 0.0]) == 1.0
    assert weighting_base.effective_sources([0.5, 0.5 * 0.5, 0.25]) == pytest.approx(math.exp(1.5 * math.log(2)))


def test_softmax_large_temperature_is_uniform_and_huge_scores_do_not_overflow() -> None:
    w = weighting_base.softmax_weights({"a": 0.1, "b": 5.0, "c": -3.0}, "higher", 1e9)
    assert w == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    w = weighting_base.softmax_weights({"a": 1e6, "b": 1e6 - 1}, "higher", 1.0)
    assert w["a"] == pytest.approx(1 / (1 + math.exp(-1)))


@pytest.mark.parametrize("tem", [0.0, -1.0, float("nan"), float("inf")])
def test_softmax_refuses_bad_temperature(tem: float) -> None:
    with pytest.raises(UserInputError, match="--tem"):
        weighting_base.softmax_weights({"a": 1.0}, "lower", tem)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_softmax_refuses_non_finite_score_naming_the_pair(bad: float) -> None:
    with pytest.raises(UserInputError, match=r"target=t1, source=s2"):
        weighting_base.softmax_weights({"s1": 1.0, "s2": bad}, "higher", 1.0, target="t1")


def test_group_softmax_gives_each_group_its_own_weights() -> None:
    scores = {"a": {"encoder.0": 0.0, "decoder.0": 1.0}, "b": {"encoder.0": 1.0, "decoder.0": 0.0}}
    w = weighting_base.group_softmax_weights(scores, "higher", 1.0, "t")
    e = math.exp(1) / (1 + math.exp(1))
    assert w["a"] == pytest.approx({"encoder.0": 1 - e, "decoder.0": e})
    assert w["b"] == pytest.approx({"encoder.0": e, "decoder.0": 1 - e})


def test_leave_one_out_and_categories_never_include_the_target() -> None:
    for t in TASKS:
        assert t not in sources.leave_one_out(t, TASKS)
        assert sources.leave_one_out(t, TASKS) == [s for s in TASKS if s != t]
        assert sources.category_sources(t, TASKS, MANUAL_CATEGORIES) == [FRIEND[t]]
    assert sources.category_sources("sent_review", TASKS, MANUAL_CATEGORIES, "topic") == ["topic_news", "topic_places"]
    with pytest.raises(UserInputError, match="no source"):
        sources.leave_one_out("sent_review", ["sent_review"])
    with pytest.raises(UserInputError, match="category"):
        sources.category_sources("sent_review", ["sent_review", "topic_news"], MANUAL_CATEGORIES)
    with pytest.raises(UserInputError, match="no manual category"):
        sources.category_sources("boolq_like", ["boolq_like", "topic_news"], MANUAL_CATEGORIES)


def test_metric_directions() -> None:
    assert weighting_similarity.metric_direction("LogitsCos") == "higher"
    for name in ("Loss", "KL", "EL2N", "GraNd"):
        assert weighting_similarity.metric_direction(name) == "lower"
    with pytest.raises(UserInputError, match="--metric"):
        weighting_similarity.metric_direction("NoSuchMetric")


def test_cosine_and_distance_by_group_hand_computed() -> None:
    enc, dec = "encoder.block.0.layer.0.SelfAttention.q.loras.delta.", "decoder.block.1.layer.0.SelfAttention.q.loras."
    dec += "delta."
    a = {enc + "lora_A": torch.tensor([[1.0, 0.0]]), enc + "lora_B": torch.tensor([[2.0], [0.0]]),
         dec + "lora_A": torch.tensor([[3.0, 4.0]])}
    b = {enc + "lora_A": torch.tensor([[1.0, 0.0]]), enc + "lora_B": torch.tensor([[0.0], [1.0]]),
         dec + "lora_A": torch.tensor([[0.0, 0.0]])}
    # flat: a=(1,0,2,0,3,4), b=(1,0,0,1,0,0): dot 1, |a|=sqrt(30), |b|=sqrt(2)
    assert weighting_cos.cosine_by_group(a, b, "model", "flat") == pytest.approx({"model": 1 / math.sqrt(60)})
    # per tensor: cos 1, 0 and 0 (zero vector) -> mean 1/3
    assert weighting_cos.cosine_by_group(a, b, "model", "per_tensor") == pytest.approx({"model": 1 / 3})
    assert weighting_cos.cosine_by_group(a, b, "layer", "flat") == pytest.approx({"encoder.0": 1 / math.sqrt(10),
                                                                           "decoder.1": 0.0})
    assert weighting_euclidean.distance_by_group(a, b, "block") == pytest.approx({"encoder": math.sqrt(5),
                                                                                  "decoder": 5.0})


# --------------------------------------------------------------------------------------------------
# fuse()


def lora_keys(stack: str, layer: int) -> tuple[str, str]:
    prefix = f"{stack}.block.{layer}.layer.0.SelfAttention.q.loras.delta."
    return prefix + "lora_A", prefix + "lora_B"


def test_fuse_is_the_exact_weighted_sum() -> None:
    ka, kb = lora_keys("encoder", 0)
    s1 = {ka: torch.tensor([[1.0, 2.0]]), kb: torch.tensor([[4.0], [8.0]])}
    s2 = {ka: torch.tensor([[3.0, -2.0]]), kb: torch.tensor([[0.0], [16.0]])}
    s3 = {ka: torch.tensor([[-1.0, 6.0]]), kb: torch.tensor([[4.0], [4.0]])}
    fused, info = merging.fuse([s1, s2, s3], [0.5, 0.25, 0.25], lora_combine="params")
    assert torch.equal(fused[ka], torch.tensor([[1.0, 2.0]]))  # 0.5+0.75-0.25, 1-0.5+1.5
    assert torch.equal(fused[kb], torch.tensor([[3.0], [9.0]]))  # 2+0+1, 4+4+1
    assert fused[ka].dtype == torch.float32 and info == {}


def test_a_low_precision_first_source_does_not_round_the_others() -> None:
    """The first source in bfloat16, the second in float32: the sum is computed in float64 and written in the
    widest dtype, so the float32 source's 1 + 2^-12 survives (bfloat16 has 8 bits of mantissa: it would be 1)."""
    ka, kb = lora_keys("encoder", 0)
    fine = 1.0 + 2.0 ** -12
    s1 = {ka: torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16), kb: torch.tensor([[4.0], [8.0]], dtype=torch.bfloat16)}
    s2 = {ka: torch.tensor([[fine, 2.0]]), kb: torch.tensor([[4.0], [8.0]])}
    fused, _ = merging.fuse([s1, s2], [0.0, 1.0], lora_combine="params")
    assert fused[ka].dtype == torch.float32 and fused[kb].dtype == torch.float32
    assert float(fused[ka][0, 0]) == fine


def test_a_non_finite_or_integer_source_is_refused_by_fuse() -> None:
    ka, kb = lora_keys("encoder", 0)
    good = {ka: torch.ones(1, 2), kb: torch.ones(2, 1)}
    for bad, words in (({ka: torch.tensor([[float("nan"), 1.0]]), kb: torch.ones(2, 1)}, "NaN or infinite"),
                       ({ka: torch.ones(1, 2, dtype=torch.int64), kb: torch.ones(2, 1)}, "floating point")):
        with pytest.raises(UserInputError, match=words):
            merging.fuse([good, bad], [0.5, 0.5], lora_combine="params")


def test_fuse_per_layer_weights_average_each_layer_with_its_own_weights() -> None:
    (ea, eb), (da, db) = lora_keys("encoder", 0), lora_keys("decoder", 1)
    s1 = {ea: torch.ones(1, 2), eb: torch.ones(2, 1), da: torch.ones(1, 2), db: torch.ones(2, 1)}
    s2 = {k: torch.zeros_like(v) for k, v in s1.items()}
    w = [{"encoder.0": 0.75, "decoder.1": 0.125}, {"encoder.0": 0.25, "decoder.1": 0.875}]
    fused, _ = merging.fuse([s1, s2], w, granularity="layer", lora_combine="params")
    assert torch.equal(fused[ea], torch.full((1, 2), 0.75)) and torch.equal(fused[eb], torch.full((2, 1), 0.75))
    assert torch.equal(fused[da], torch.full((1, 2), 0.125)) and torch.equal(fused[db], torch.full((2, 1), 0.125))
    with pytest.raises(UserInputError, match="decoder.1"):
        merging.fuse([s1, s2], [{"encoder.0": 1.0}, {"encoder.0": 0.0}], granularity="layer")


def random_lora(seed: int, r: int = 3, d_out: int = 6, d_in: int = 5, shared_a: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    ka, kb = lora_keys("encoder", 0)
    a = shared_a if shared_a is not None else torch.randn(r, d_in, generator=g)
    return {ka: a, kb: torch.randn(d_out, r, generator=g)}


def test_delta_w_is_the_best_rank_r_approximation_of_the_weighted_sum() -> None:
    ka, kb = lora_keys("encoder", 0)
    sources, w, scaling = [random_lora(s) for s in range(3)], [0.5, 0.3, 0.2], 8 / 3
    total = sum(wi * (s[kb].double() @ s[ka].double()) * scaling for wi, s in zip(w, sources))
    u, sv, vh = torch.linalg.svd(total)
    best = u[:, :3] @ torch.diag(sv[:3]) @ vh[:3]  # Eckart-Young: the best rank-3 approximation
    fused, info = merging.fuse(sources, w, lora_combine="delta_w", lora_scaling=scaling)
    assert fused[ka].shape == (3, 5) and fused[kb].shape == (6, 3)
    product = fused[kb].double() @ fused[ka].double() * scaling
    torch.testing.assert_close(product, best, rtol=1e-5, atol=1e-5)
    expected_err = float(torch.linalg.matrix_norm(total - best) / torch.linalg.matrix_norm(total))
    assert expected_err > 0.01  # three rank-3 sources summed: truly truncated
    assert info["lora_truncation_error"] == pytest.approx(expected_err, rel=1e-4)
    # singular values split symmetrically: both factors carry sqrt(S / scaling)
    torch.testing.assert_close(torch.linalg.norm(fused[kb].double(), dim=0),
                               torch.linalg.norm(fused[ka].double(), dim=1), rtol=1e-5, atol=1e-6)
    params, _ = merging.fuse(sources, w, lora_combine="params")
    assert not torch.allclose(params[kb].double() @ params[ka].double() * scaling, best, atol=1e-2)


def test_delta_w_is_exact_when_the_sum_has_rank_at_most_r() -> None:
    ka, kb = lora_keys("encoder", 0)
    shared = torch.randn(3, 5, generator=torch.Generator().manual_seed(9))
    sources, w = [random_lora(s, shared_a=shared) for s in range(4)], [0.1, 0.2, 0.3, 0.4]
    total = sum(wi * (s[kb].double() @ s[ka].double()) for wi, s in zip(w, sources))  # (Σ w B) A: rank <= 3
    fused, info = merging.fuse(sources, w, lora_combine="delta_w", lora_scaling=2.0)
    torch.testing.assert_close(fused[kb].double() @ fused[ka].double() * 2.0, total * 2.0, rtol=1e-5, atol=1e-5)
    assert info["lora_truncation_error"] < 1e-6


def test_fuse_streams_one_source_at_a_time() -> None:
    live, peak = [0], [0]

    class Tracked(dict):
        def __init__(self, *a):
            super().__init__(*a)
            live[0] += 1
            peak[0] = max(peak[0], live[0])

        def __del__(self):
            live[0] -= 1

    loaders = [lambda seed=seed: Tracked(random_lora(seed)) for seed in range(12)]
    for combine in merging.LORA_COMBINES:
        peak[0] = 0
        merging.fuse(loaders, [1 / 12] * 12, lora_combine=combine)  # delta_w: a second pass, pair by pair
        assert peak[0] <= 2, f"{combine}: {peak[0]} source modules alive at once"
        assert live[0] == 0
    with pytest.raises(TypeError, match="twice"):
        merging.fuse(iter(loaders), [1 / 12] * 12, lora_combine="delta_w")


def test_fuse_refuses_mismatched_or_missing_sources() -> None:
    with pytest.raises(UserInputError, match="shapes differ"):
        merging.fuse([random_lora(0), random_lora(1, r=2)], [0.5, 0.5])
    with pytest.raises(UserInputError, match="empty"):
        merging.fuse([], [])


# --------------------------------------------------------------------------------------------------
# Fixtures on disk: source modules of a tiny T5 and the outputs of the other stages


@pytest.fixture(scope="module")
def lora_model(tiny_backbone_dir: Path):
    model, _ = load_backbone(tiny_backbone_dir)
    torch.manual_seed(0)
    attach_delta(model, LORA)
    return model


def perturbed(base: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}


def save(path: Path, tensors: dict[str, torch.Tensor], backbone_dir: Path, model, cfg: DeltaConfig = LORA,
         task: str = "x") -> None:
    save_delta_checkpoint(path, tensors, cfg, backbone_name(backbone_dir), backbone_fingerprint(model), task=task)


@pytest.fixture
def world(tmp_path: Path, tiny_backbone_dir: Path, lora_model) -> dict:
    """sources/, random_tuned/, tuneall/, devall.tsv and similarity.tsv for TASKS, with FRIEND most similar."""
    base = delta_state_dict(lora_model)
    theta = {t: perturbed(base, seed=i, scale=0.5) for i, t in enumerate(TASKS)}
    for t in TASKS:
        save(tmp_path / "sources" / t, theta[t], tiny_backbone_dir, lora_model, task=t)
        # the target's few-shot module points the way of its friend
        save(tmp_path / "random_tuned" / t, perturbed(theta[FRIEND[t]], 100 + TASKS.index(t), 0.01),
             tiny_backbone_dir, lora_model, task=t)
        for j, s in enumerate(sources.leave_one_out(t, TASKS)):
            # the friend hardly moves when tuned on the target
            moved = perturbed(theta[s], 200 + 10 * TASKS.index(t) + j, 0.01 if s == FRIEND[t] else 0.3)
            save(tmp_path / "tuneall" / t / s, moved, tiny_backbone_dir, lora_model, task=t)
    with open(tmp_path / "devall.tsv", "w") as f:
        f.write("target\tsource\tdev_zero_shot\tdev_after\n")
        for t in TASKS:
            for s in sources.leave_one_out(t, TASKS):
                f.write(f"{t}\t{s}\t0.2\t{0.9 if s == FRIEND[t] else 0.4}\n")
            f.write(f"{t}\t{t}\t0.2\t-\n")  # no tuned module of a task on itself: never read
    groups = sorted({param_group(k, "layer") for k in base})
    with open(tmp_path / "similarity.tsv", "w") as f:
        f.write("target\tsource\tmetric\tgroup\tscore\n")
        for t in TASKS:
            for s in sources.leave_one_out(t, TASKS):
                near = s == FRIEND[t]
                f.write(f"{t}\t{s}\tLoss\tmodel\t{0.5 if near else 2.0}\n")
                f.write(f"{t}\t{s}\tLogitsCos\tmodel\t{0.9 if near else 0.1}\n")
                for g in groups:  # per layer: the friend wins the encoder layers only
                    good = near == g.startswith("encoder")
                    f.write(f"{t}\t{s}\tLoss\t{g}\t{0.5 if good else 2.0}\n")
    return {"root": tmp_path, "theta": theta, "groups": groups, "base": base}


def read_weights(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def weights_of(rows: list[dict[str, str]], target: str, group: str | None = None) -> dict[str, float]:
    return {r["source"]: float(r["weight"]) for r in rows
            if r["target"] == target and (group is None or r["group"] == group)}


def run(module, argv: list[str]) -> int:
    return run_cli(module.main, argv)


def common(root: Path, out: str, *extra: str) -> list[str]:
    return ["--tasks", *TASKS, "--source_ckpt_path", str(root / "sources"), "--save_ckpt_path", str(root / out),
            *extra]


def check_outputs(save_dir: Path) -> list[dict[str, str]]:
    assert {p.name for p in save_dir.iterdir()} == {*(f"without_{t}" for t in TASKS), "weights.tsv", "heatmap.png",
                                                   "fusion_settings.json"}
    assert (save_dir / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in save_dir.parent.iterdir() if p.name.startswith(f".{save_dir.name}.")]  # no staging left
    rows = read_weights(save_dir / "weights.tsv")
    for t in TASKS:
        tensors, meta = load_delta_checkpoint(save_dir / f"without_{t}")
        assert meta["task"] == t and meta["method"] == "lora" and meta["sizes"] == LORA.sizes()
        assert t not in meta["extra"]["sources"]
        for g in {r.get("group") for r in rows}:  # weights sum to 1 (per group when granular)
            assert sum(weights_of(rows, t, g).values()) == pytest.approx(1.0)
    return rows


def expected_fusion(theta: dict[str, dict[str, torch.Tensor]], weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Σ_s w_s θ_s in a float64 accumulator (add_ with alpha rounds like fuse does: bit-equal results)."""
    out = {}
    for k in next(iter(theta.values())):
        acc = torch.zeros(theta[next(iter(weights))][k].shape, dtype=torch.float64)
        for s, w in weights.items():
            acc.add_(theta[s][k].double(), alpha=w)
        out[k] = acc.float()
    return out


def assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------------
# The five scripts, end to end


def test_average_all_and_manual(world: dict) -> None:
    root = world["root"]
    assert run(unit_model_average, common(root, "avg", "--lora_combine", "params")) == 0
    rows = check_outputs(root / "avg")
    for t in TASKS:
        w = weights_of(rows, t)
        assert w == pytest.approx({s: 1 / 3 for s in TASKS if s != t})
        tensors, meta = load_delta_checkpoint(root / "avg" / f"without_{t}")
        assert_tensors_equal(tensors, expected_fusion(world["theta"], w))
        assert meta["extra"]["fusion"] == "average" and meta["extra"]["lora_combine"] == "params"

    assert run(unit_model_average, common(root, "manual", "--manual", "--lora_combine", "params")) == 0
    rows = check_outputs(root / "manual")
    for t in TASKS:
        assert weights_of(rows, t) == {FRIEND[t]: 1.0}
        tensors, _ = load_delta_checkpoint(root / "manual" / f"without_{t}")
        assert_tensors_equal(tensors, world["theta"][FRIEND[t]])


def test_delta_w_fused_checkpoint_matches_truncated_svd(world: dict) -> None:
    root = world["root"]
    assert run(unit_model_average, common(root, "avg_dw")) == 0  # delta_w is the default
    t = "sent_review"
    tensors, meta = load_delta_checkpoint(root / "avg_dw" / f"without_{t}")
    assert meta["extra"]["lora_combine"] == "delta_w"
    scaling = LORA.lora_alpha / LORA.lora_r
    errors = []
    for ka in [k for k in tensors if k.endswith("lora_A")]:
        kb = ka[: -len("lora_A")] + "lora_B"
        total = sum(world["theta"][s][kb].double() @ world["theta"][s][ka].double() for s in TASKS if s != t) / 3
        u, sv, vh = torch.linalg.svd(total * scaling)
        best = u[:, :4] @ torch.diag(sv[:4]) @ vh[:4]
        torch.testing.assert_close(tensors[kb].double() @ tensors[ka].double() * scaling, best, rtol=1e-4, atol=1e-5)
        errors.append((float(torch.linalg.matrix_norm(total * scaling - best)), float(sv.square().sum())))
    expected = math.sqrt(sum(e * e for e, _ in errors) / sum(n for _, n in errors))
    assert meta["extra"]["lora_truncation_error"] == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("granularity", ["model", "layer"])
def test_cos_gives_the_friend_the_largest_weight(world: dict, granularity: str) -> None:
    root = world["root"]
    argv = common(root, "cos", "--random_tuned_ckpt_path", str(root / "random_tuned"), "--tem", "0.1",
                  "--granularity", granularity, "--lora_combine", "params")
    assert run(unit_model_cos, argv) == 0
    rows = check_outputs(root / "cos")
    for t in TASKS:
        for g in ([None] if granularity == "model" else world["groups"]):
            w = weights_of(rows, t, g)
            assert max(w, key=w.get) == FRIEND[t]
    if granularity == "model":
        # By default the weight is the softmax of the z-scored cosines of task vectors: ΔW = B·A·alpha/r
        # per LoRA pair, not the raw factors; --score_space params compares the factors (the original's).
        t = TASKS[0]

        def expected(vectors) -> dict[str, float]:
            cos = {s: weighting_cos.cosine_by_group(vectors(root / "random_tuned" / t), vectors(root / "sources" / s))
                   ["model"] for s in TASKS if s != t}
            mean = sum(cos.values()) / 3
            std = math.sqrt(sum((c - mean) ** 2 for c in cos.values()) / 3)
            z = {s: math.exp((c - mean) / std / 0.1) for s, c in cos.items()}
            return {s: v / sum(z.values()) for s, v in z.items()}

        def task_vector(folder: Path) -> dict[str, torch.Tensor]:
            tensors, meta = load_delta_checkpoint(folder)
            cfg = DeltaConfig.from_checkpoint_meta(meta)
            vector = cfg.spec.task_vector(tensors, cfg.sizes())
            assert not [k for k in vector if "lora_A" in k]  # one ΔW per pair, under the pair's name
            return vector

        assert weights_of(rows, t) == pytest.approx(expected(task_vector), rel=1e-6)
        assert run(unit_model_cos, [*argv, "--save_ckpt_path", str(root / "cos_p"), "--score_space", "params"]) == 0
        raw = weights_of(check_outputs(root / "cos_p"), t)
        assert raw == pytest.approx(expected(lambda folder: load_delta_checkpoint(folder)[0]), rel=1e-6)
        assert raw != pytest.approx(weights_of(rows, t), rel=1e-3)


def test_euclidean_weights_and_averages_the_original_sources(world: dict) -> None:
    root = world["root"]
    argv = common(root, "euc", "--tuneall_ckpt_path", str(root / "tuneall"), "--tem", "0.5",
                  "--lora_combine", "params")
    assert run(unit_model_Euclidean, argv) == 0
    rows = check_outputs(root / "euc")
    for t in TASKS:
        w = weights_of(rows, t)
        assert max(w, key=w.get) == FRIEND[t]
        tensors, meta = load_delta_checkpoint(root / "euc" / f"without_{t}")
        assert_tensors_equal(tensors, expected_fusion(world["theta"], w))
        assert all("/sources/" in p for p in meta["extra"]["source_checkpoints"])


def zscore_softmax(scores: dict[str, float], temperature: float, lower_is_better: bool = False) -> dict[str, float]:
    """softmax(±z / T) of a target's scores, by hand: z-scores with the population std, as weight_norm zscore."""
    mean = sum(scores.values()) / len(scores)
    std = math.sqrt(sum((v - mean) ** 2 for v in scores.values()) / len(scores))
    sign = -1.0 if lower_is_better else 1.0
    e = {s: math.exp(sign * (v - mean) / std / temperature) for s, v in scores.items()}
    return {s: v / sum(e.values()) for s, v in e.items()}


def task_vector_of(folder: Path) -> dict[str, torch.Tensor]:
    tensors, meta = load_delta_checkpoint(folder)
    cfg = DeltaConfig.from_checkpoint_meta(meta)
    return cfg.spec.task_vector(tensors, cfg.sizes())


def test_euclidean_weights_exactly(world: dict) -> None:
    """Each weight by hand: the distance between a source's task vector (LoRA: ΔW per pair) and that of the same
    source tuned on the target, z-scored over the target's sources, lower is better, softmax at T = 0.5."""
    root = world["root"]
    assert run(unit_model_Euclidean, common(root, "euc_x", "--tuneall_ckpt_path", str(root / "tuneall"), "--tem",
                                            "0.5", "--lora_combine", "params")) == 0
    rows = read_weights(root / "euc_x" / "weights.tsv")
    for t in TASKS:
        distance = {}
        for s in (s for s in TASKS if s != t):
            a, b = task_vector_of(root / "sources" / s), task_vector_of(root / "tuneall" / t / s)
            distance[s] = math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a))
        assert weights_of(rows, t) == pytest.approx(zscore_softmax(distance, 0.5, lower_is_better=True), rel=1e-6)


def test_per_layer_cos_weights_exactly(world: dict) -> None:
    """--granularity layer: a weight per (source, layer) from the cosine of that layer's task vectors alone,
    z-scored over the target's sources within the layer, softmax at T = 0.1."""
    root = world["root"]
    assert run(unit_model_cos, common(root, "cos_lx", "--random_tuned_ckpt_path", str(root / "random_tuned"),
                                      "--tem", "0.1", "--granularity", "layer", "--lora_combine", "params")) == 0
    rows = read_weights(root / "cos_lx" / "weights.tsv")
    t = TASKS[1]
    reference = task_vector_of(root / "random_tuned" / t)
    vectors = {s: task_vector_of(root / "sources" / s) for s in TASKS if s != t}
    for group in world["groups"]:
        keys = [k for k in reference if param_group(k, "layer") == group]
        assert keys, group
        cos = {}
        for s, v in vectors.items():
            dot = sum(float((reference[k].double() * v[k].double()).sum()) for k in keys)
            na = math.sqrt(sum(float((reference[k].double() ** 2).sum()) for k in keys))
            nb = math.sqrt(sum(float((v[k].double() ** 2).sum()) for k in keys))
            cos[s] = dot / (na * nb)
        assert weights_of(rows, t, group) == pytest.approx(zscore_softmax(cos, 0.1), rel=1e-6), group


def test_performance_averages_the_original_sources_unless_asked(world: dict) -> None:
    """By default Performance averages the original sources (its arm sees the target only in its own tuning);
    --average_tuned is the original code's choice. --weight_norm none: the original's raw-gain softmax."""
    root = world["root"]
    base = common(root, "perf", "--tuneall_ckpt_path", str(root / "tuneall"), "--devall_tsv",
                  str(root / "devall.tsv"), "--tem", "0.1", "--lora_combine", "params", "--weight_norm", "none")
    assert run(unit_model_Performance, base) == 0
    rows = check_outputs(root / "perf")
    t = "topic_news"
    w = weights_of(rows, t)
    e = math.exp(0.5 / 0.1)  # gains 0.7 (friend) and 0.2: softmax of (0.7, 0.2, 0.2) / 0.1
    assert w == pytest.approx({"topic_places": e / (e + 2), "sent_review": 1 / (e + 2), "sent_tweet": 1 / (e + 2)})
    assert_tensors_equal(load_delta_checkpoint(root / "perf" / f"without_{t}")[0],
                         expected_fusion(world["theta"], w))

    assert run(unit_model_Performance, [*base, "--save_ckpt_path", str(root / "perf_t"), "--average_tuned"]) == 0
    tuned = {s: load_delta_checkpoint(root / "tuneall" / t / s)[0] for s in w}
    assert_tensors_equal(load_delta_checkpoint(root / "perf_t" / f"without_{t}")[0], expected_fusion(tuned, w))


@pytest.mark.parametrize("metric", ["Loss", "LogitsCos"])
def test_others_uses_each_metrics_direction(world: dict, metric: str) -> None:
    root = world["root"]
    argv = common(root, "oth", "--result_tsv", str(root / "similarity.tsv"), "--metric", metric, "--tem", "0.5",
                  "--lora_combine", "params")
    assert run(unit_model_others, argv) == 0
    rows = check_outputs(root / "oth")
    for t in TASKS:
        w = weights_of(rows, t)
        assert max(w, key=w.get) == FRIEND[t]  # low Loss and high LogitsCos both mean similar
    meta = load_delta_checkpoint(root / "oth" / f"without_{TASKS[0]}")[1]
    assert meta["extra"]["metric"] == metric
    assert meta["extra"]["direction"] == ("higher" if metric == "LogitsCos" else "lower")


def test_a_held_out_target_and_a_retrieved_table(world: dict) -> None:
    """A target outside --tasks takes every task of the pool as a source; a table scored with a prefilter (two-stage
    retrieval) is fused over the sources it scored, while a full table missing a source is refused."""
    import json

    root, t = world["root"], "sent_review"
    pool = [s for s in TASKS if s != t]
    argv = ["--tasks", *pool, "--targets", t, "--source_ckpt_path", str(root / "sources"), "--result_tsv",
            str(root / "similarity.tsv"), "--metric", "Loss", "--lora_combine", "params"]
    assert run(unit_model_others, [*argv, "--save_ckpt_path", str(root / "held_out")]) == 0
    w = weights_of(read_weights(root / "held_out" / "weights.tsv"), t)
    assert sorted(w) == sorted(pool) and max(w, key=w.get) == FRIEND[t]
    retrieved = root / "retrieved"
    retrieved.mkdir()
    kept = [FRIEND[t], "topic_news"]
    lines = (root / "similarity.tsv").read_text().splitlines()
    (retrieved / "result.tsv").write_text("\n".join([lines[0], *[x for x in lines[1:] if x.split("\t")[0] != t
                                                                  or x.split("\t")[1] in kept]]) + "\n")
    table = ["--result_tsv", str(retrieved / "result.tsv")]
    assert run(unit_model_others, [*argv, *table, "--save_ckpt_path", str(root / "full_missing")]) == 2
    (retrieved / "score_settings.json").write_text(json.dumps({"prefilter": "Arrow", "prefilter_top": 2}))
    assert run(unit_model_others, [*argv, *table, "--save_ckpt_path", str(root / "two")]) == 0
    w = weights_of(read_weights(root / "two" / "weights.tsv"), t)
    assert sorted(w) == sorted(kept)
    assert_tensors_equal(load_delta_checkpoint(root / "two" / f"without_{t}")[0], expected_fusion(world["theta"], w))


def test_others_per_layer_weights_and_averaging(world: dict) -> None:
    root = world["root"]
    argv = common(root, "oth_l", "--result_tsv", str(root / "similarity.tsv"), "--metric", "Loss",
                  "--granularity", "layer", "--lora_combine", "params")
    assert run(unit_model_others, argv) == 0
    rows = check_outputs(root / "oth_l")
    assert list(rows[0]) == ["target", "source", "group", "score", "weight", "effective_sources"]
    t = "sent_review"
    tensors, meta = load_delta_checkpoint(root / "oth_l" / f"without_{t}")
    # scores 0.5 vs 2.0, 2.0 (direction lower) z-scored: mean 1.5, std sqrt(0.5), so the odd one out is
    # 1.5 / sqrt(0.5) above the other two at T=1
    e = math.exp(1.5 / math.sqrt(0.5))
    for g in world["groups"]:
        w = weights_of(rows, t, g)
        if g.startswith("encoder"):
            assert w == pytest.approx({"sent_tweet": e / (e + 2), "topic_news": 1 / (e + 2),
                                       "topic_places": 1 / (e + 2)})
        else:
            assert w == pytest.approx({"sent_tweet": 1 / (2 * e + 1), "topic_news": e / (2 * e + 1),
                                       "topic_places": e / (2 * e + 1)})
        expected = expected_fusion(world["theta"], w)
        for k in tensors:
            if param_group(k, "layer") == g:
                assert torch.equal(tensors[k], expected[k]), k
    assert meta["extra"]["granularity"] == "layer" and isinstance(meta["extra"]["weights"]["sent_tweet"], dict)


# --------------------------------------------------------------------------------------------------
# The fused module is usable


def test_fused_model_gives_the_logits_of_the_averaged_weights(world: dict, tiny_backbone_dir: Path) -> None:
    root = world["root"]
    assert run(unit_model_average, common(root, "avg", "--lora_combine", "params")) == 0
    t = "topic_places"
    averaged = expected_fusion(world["theta"], {s: 1 / 3 for s in TASKS if s != t})
    fused, _ = load_delta_checkpoint(root / "avg" / f"without_{t}")
    ids = torch.randint(2, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(2, 100, (2, 4), generator=torch.Generator().manual_seed(2))
    out = []
    for tensors in (averaged, fused):
        model, _ = load_backbone(tiny_backbone_dir)
        attach_delta(model, LORA)
        load_delta_state(model, tensors, "test")
        with torch.no_grad():
            out.append(model(input_ids=ids, labels=labels).logits)
    assert torch.equal(out[0], out[1])
    model, _ = load_backbone(tiny_backbone_dir)
    attach_delta(model, LORA)
    with torch.no_grad():  # and the fused module changes the model (it is not the neutral start)
        assert not torch.allclose(model(input_ids=ids, labels=labels).logits, out[1], atol=1e-4)


@pytest.mark.slow
def test_fused_checkpoint_trains_in_tune_py(world: dict, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    root = world["root"]
    assert run(unit_model_average, common(root, "avg_dw")) == 0
    task_dir = tmp_path / "tasks"
    (task_dir / "tiny").mkdir(parents=True)
    for split in ("train", "dev"):
        lines = [f"review {i} : is this good ?\t{'yes' if i % 2 else 'no'}" for i in range(4)]
        (task_dir / "tiny" / f"tiny_4_1_{split}.tsv").write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, str(REPO / "tune.py"), "--do_train", "--tune_method", "lora", "--lora_r", "4",
           "--lora_alpha", "8", "--train_checkpoint", str(root / "avg_dw" / "without_sent_review"),
           "--model", str(tiny_backbone_dir), "--task_dir", str(task_dir), "--tasks", "tiny", "--k", "4",
           "--data_seed", "1", "--train_iters", "1", "--valid_interval", "1", "--warmup_steps", "0",
           "--bsz_list", "2", "--max_output_length", "4", "--device", "cpu", "--quiet",
           "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (only_run(tmp_path / "out" / "tiny") / "log.txt").read_text()
    assert "without_sent_review" in text  # initialised from the fused checkpoint


@pytest.mark.cli
def test_script_runs_as_a_file_and_has_help(world: dict) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "unit_model" / "unit_model_cos.py"), "--help"],
                          capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--delta", "--tasks", "--source_ckpt_path", "--random_tuned_ckpt_path", "--save_ckpt_path",
                 "--tem", "--cos_mode", "--granularity", "--lora_combine"):
        assert flag in proc.stdout
    help_text = " ".join(proc.stdout.split())  # argparse wraps lines
    assert "(default: flat)" in help_text and "(default: delta_w)" in help_text
    root = world["root"]
    proc = subprocess.run([sys.executable, str(REPO / "unit_model" / "unit_model_cos.py"),
                           *common(root, "cos_file", "--random_tuned_ckpt_path", str(root / "nowhere"))],
                          capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "nowhere" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming the culprit, nothing in save_ckpt_path


def _nan_similarity(root: Path) -> None:
    text = (root / "similarity.tsv").read_text()
    (root / "similarity.tsv").write_text(text.replace("topic_news\tsent_tweet\tLoss\tmodel\t2.0",
                                                      "topic_news\tsent_tweet\tLoss\tmodel\tnan"))


def _remove_source(root: Path, _: Path) -> None:
    shutil.rmtree(root / "sources" / "topic_news")


def _different_sizes(root: Path, tiny_backbone_dir: Path) -> None:
    cfg = DeltaConfig("lora", lora_r=2, lora_alpha=8)
    model, _ = load_backbone(tiny_backbone_dir)
    attach_delta(model, cfg)
    save(root / "sources" / "topic_places", delta_state_dict(model), tiny_backbone_dir, model, cfg)


BAD_INPUTS = {
    "zero temperature": (unit_model_average, ["--tem", "0"], None, "--tem"),
    "negative temperature": (unit_model_cos, ["--tem", "-1"], None, "--tem"),
    "missing source": (unit_model_average, [], _remove_source, "topic_news"),
    "different sizes": (unit_model_average, [], _different_sizes, "topic_places"),
    "nan score": (unit_model_others, ["--metric", "Loss"], lambda root, _: _nan_similarity(root),
                  "target=topic_news, source=sent_tweet"),
    "target absent": (unit_model_others, ["--metric", "Loss", "--tasks", *TASKS, "ext_food"], None, "ext_food"),
    "empty source list": (unit_model_average, ["--tasks", "sent_review"], None, "no source"),
    "no friend in category": (unit_model_average, ["--manual", "--tasks", "sent_review", "topic_news"], None,
                              "category"),
    "two metrics, none chosen": (unit_model_others, [], None, "--metric"),
    "method mismatch": (unit_model_average, ["--delta", "adapter"], None, "--delta is adapter"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_and_writes_nothing(case: str, world: dict, tiny_backbone_dir: Path, capsys) -> None:
    module, extra, damage, message = BAD_INPUTS[case]
    root = world["root"]
    if damage is not None:
        damage(root, tiny_backbone_dir)
    argv = common(root, "bad", "--random_tuned_ckpt_path", str(root / "random_tuned")) if module is unit_model_cos \
        else common(root, "bad")
    if module is unit_model_others:
        argv += ["--result_tsv", str(root / "similarity.tsv")]
    capsys.readouterr()
    assert run(module, argv + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (root / "bad").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".bad.")]


# --------------------------------------------------------------------------------------------------
# --tem auto: the temperature chosen on the dev split, never on test


def test_choose_temperatures_takes_the_best_dev_score_and_ties_go_to_the_larger_t() -> None:
    from unit_model.temperature import TEMPERATURE_GRID, choose_temperatures

    scores = {"a": {"model": 1.0}, "b": {"model": 3.0}, "c": {"model": 2.0}}
    plan = weighting_base.Plan("t", ["a", "b", "c"], [], {}, scores, "higher")
    # a dev score that peaks where source b gets weight 0.6 (the fused "module" is the weights themselves)
    choose_temperatures([plan], "zscore", lambda p, w: {"b": torch.tensor(w["b"]["model"])},
                        lambda target, fused: -abs(float(fused["b"]) - 0.6))
    expected = min(TEMPERATURE_GRID,
                   key=lambda t: abs(weighting_base.softmax_weights({s: v["model"] for s, v in scores.items()},
                                                                    "higher", t, norm="zscore")["b"] - 0.6))
    # z-scores -1.22, 1.22, 0: w_b is 0.91 at T = 0.5, 0.72 at T = 1, 0.54 at T = 2 (the closest to 0.6)
    assert plan.temperature == expected == 2.0
    assert plan.weights["b"]["model"] == pytest.approx(math.exp(1.5 ** 0.5 / 2) / (2 * math.cosh(1.5 ** 0.5 / 2) + 1))
    assert sorted(plan.temperature_dev) == sorted(TEMPERATURE_GRID)
    flat = weighting_base.Plan("t", ["a", "b", "c"], [], {}, scores, "higher")
    choose_temperatures([flat], "zscore", lambda p, w: {}, lambda target, fused: 0.5)
    assert flat.temperature == max(TEMPERATURE_GRID)  # every T alike: the weights closest to uniform
    uniform = weighting_base.Plan("t", ["a"], [], {"a": {"model": 1.0}}, None)
    choose_temperatures([uniform], "zscore", lambda p, w: {}, lambda target, fused: 0.0)
    assert uniform.temperature is None  # an average has no temperature to choose


def suite_copy(root: Path) -> Path:
    """TASKS' 16-shot files of the bundled suite, to poison one split of."""
    from dataloader.synthetic import SUITE_DIR

    for t in TASKS:
        (root / t).mkdir(parents=True)
        for f in (SUITE_DIR / t).glob(f"{t}_16_100_*.tsv"):
            shutil.copyfile(f, root / t / f.name)
    return root


def test_tem_auto_never_reads_the_test_split(world, tiny_backbone_dir, tmp_path) -> None:
    """The choice of T reads the dev split only: a test split rewritten with other labels, or made unreadable,
    changes nothing; a dev split made unreadable is reported."""
    root = world["root"]
    data = suite_copy(tmp_path / "data")
    auto = ["--tem", "auto", "--model", str(tiny_backbone_dir), "--task_dir", str(data), "--device", "cpu"]

    def fused(out: str) -> tuple[list[dict[str, str]], dict]:
        assert run(unit_model_others, common(root, out, "--result_tsv", str(root / "similarity.tsv"),
                                             "--metric", "Loss", *auto)) == 0
        meta = {t: load_delta_checkpoint(root / out / f"without_{t}")[1]["extra"] for t in TASKS}
        return read_weights(root / out / "weights.tsv"), meta

    clean_weights, clean_meta = fused("clean")
    assert {r["temperature"] for r in clean_weights} <= {"0.1", "0.25", "0.5", "1", "2", "4"}
    for t in TASKS:
        assert sorted(clean_meta[t]["temperature_dev"]) == sorted(["0.1", "0.25", "0.5", "1", "2", "4"])
        assert f"{clean_meta[t]['temperature']:g}" == next(r["temperature"] for r in clean_weights if r["target"] == t)
    for t in TASKS:  # other gold labels on test, then a test file no reader could parse
        test = data / t / f"{t}_16_100_test.tsv"
        test.write_text("".join(line.split("\t")[0] + "\tpoisoned\n" for line in test.read_text().splitlines()))
    assert fused("relabelled") == (clean_weights, clean_meta)
    for t in TASKS:
        (data / t / f"{t}_16_100_test.tsv").write_bytes(b"\xff\xfe not a tsv line\n")
    assert fused("unreadable_test") == (clean_weights, clean_meta)
    dev = data / TASKS[0] / f"{TASKS[0]}_16_100_dev.tsv"
    dev.write_text("no tab here\n")
    with pytest.raises(UserInputError, match=str(dev)):
        unit_model_others.main(common(root, "bad_dev", "--result_tsv", str(root / "similarity.tsv"),
                                      "--metric", "Loss", *auto))
    assert not (root / "bad_dev").exists()
