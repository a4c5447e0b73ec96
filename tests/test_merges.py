"""Merge operators (unit_model/merges/): PEFT's merge_utils as the oracle, hand-computed TIES and DARE cases,
task vectors measured from each method's origin, top-k selection and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from peft.utils import merge_utils  # a requirement, the oracle: imported plainly, never skipped

from unit_model.merges import MERGES, merge_settings_from
from unit_model.merges.base import drop, elect_and_merge, trim
from unit_model.merging import fuse
from unit_model.weightings.base import keep_top_k
from utils.errors import UserInputError


def task_vectors(n: int = 4, shape: tuple[int, ...] = (6, 5), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def combine(name: str, vectors, weights, **settings) -> torch.Tensor:
    return MERGES[name].combine(vectors, weights, merge_settings_from(settings), "encoder.block.0.q.weight")


# --------------------------------------------------------------------------------------------------
# PEFT as the oracle, where the definitions coincide


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_magnitude_prune_and_task_arithmetic_agree_with_peft(density: float) -> None:
    vectors, weights = task_vectors(), [0.4, 0.3, 0.2, 0.1]
    w = torch.tensor(weights, dtype=torch.float64)
    torch.testing.assert_close(combine("task_arithmetic", vectors, weights), merge_utils.task_arithmetic(vectors, w))
    with pytest.warns(UserWarning) if density >= 1 else _no_warning():
        expected = merge_utils.magnitude_prune(vectors, w, density)
    torch.testing.assert_close(combine("magnitude_prune", vectors, weights, density=density), expected)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.6])
def test_ties_with_uniform_weights_is_peft_ties_with_every_weight_one(density: float, majority_sign: str) -> None:
    """Our disjoint mean is weighted (Σ_agree w τ / Σ_agree w); with uniform weights it is PEFT's, whatever
    the common weight, and PEFT's is defined with weights 1 (its election ignores the weights)."""
    vectors = task_vectors(5)
    ones = torch.ones(5, dtype=torch.float64)
    expected = merge_utils.ties(vectors, ones, density, majority_sign)
    torch.testing.assert_close(combine("ties", vectors, [0.2] * 5, density=density, majority_sign=majority_sign),
                               expected)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_agrees_with_peft_given_the_same_drops(name: str) -> None:
    """PEFT draws its drops from torch's global generator; seeding it as ours is seeded gives the same masks."""
    vectors, density = task_vectors(3), 0.5
    settings = merge_settings_from(dict(density=density, merge_seed=7))
    key = "decoder.block.1.layer.0.SelfAttention.q"
    ours = MERGES[name].combine(vectors, [1.0, 1.0, 1.0], settings, key)
    torch.manual_seed(settings.generator(key).initial_seed())
    ones = torch.ones(3, dtype=torch.float64)
    theirs = (merge_utils.dare_linear(vectors, ones, density) if name == "dare_linear"
              else merge_utils.dare_ties(vectors, ones, density, "total"))
    torch.testing.assert_close(ours, theirs)


# --------------------------------------------------------------------------------------------------
# Hand-computed cases on 3x3 task vectors


A = torch.tensor([[3.0, -1.0, 0.5], [0.0, 2.0, -4.0], [1.0, 1.0, -1.0]], dtype=torch.float64)
B = torch.tensor([[-2.0, 1.0, 0.5], [1.0, -3.0, 1.0], [0.0, 2.0, 1.0]], dtype=torch.float64)


def test_trim_keeps_the_largest_magnitudes() -> None:
    # 9 entries at density 1/3: int(3) = 3 kept, the largest |.|: -4, 3, 2
    assert torch.equal(trim(A, 1 / 3), torch.tensor([[3.0, 0, 0], [0, 2.0, -4.0], [0, 0, 0]], dtype=torch.float64))


def test_ties_by_hand() -> None:
    """Weights 0.75 and 0.25, density 1 (no trimming): per entry, the sign of 0.75a + 0.25b wins, and the
    weighted mean of the agreeing entries is kept."""
    merged = elect_and_merge([A, B], [0.75, 0.25], "total")
    expected = torch.tensor([
        [3.0, -1.0, 0.5],  # 3 vs -2: mass +1.75, only a agrees; -1 vs 1: mass -0.5, a; 0.5 and 0.5 agree: 0.5
        [1.0, 2.0, -4.0],  # 0 vs 1: mass +0.25, b alone (a's 0 has no sign); 2 vs -3: +0.75, a; -4 vs 1: a
        [1.0, (0.75 * 1 + 0.25 * 2) / 1.0, -1.0],  # 1 vs 0: a; 1 and 2 agree: (0.75 + 0.5) / 1; -1 vs 1: a
    ], dtype=torch.float64)
    torch.testing.assert_close(merged, expected)
    # by count of weight instead of mass: entry (0, 0) is 3 (w .75) vs -2 (w .25), a wins either way; entry
    # (1, 1) is 2 (w .75) vs -3 (w .25): by mass +0.75, by count +0.5: a again; flip the weights to make b win
    flipped = elect_and_merge([A, B], [0.25, 0.75], "frequency")
    assert flipped[1, 1] == -3.0 and flipped[0, 0] == -2.0


def test_ties_with_unequal_weights_and_trimming_by_hand() -> None:
    """Density 1/3 (3 of 9 entries kept per source) and weights 0.25, 0.75: the trims, the weighted sign
    election and the weighted mean of the agreeing entries, worked out entry by entry."""
    b2 = torch.tensor([[2.5, 0.0, 0.0], [0.0, -3.0, -1.0], [0.0, 0.0, 0.1]], dtype=torch.float64)
    # trim(A): 3, 2, -4 kept; trim(b2): 2.5, -3, -1 kept (0.1 is the fourth largest)
    merged = combine("ties", [A, b2], [0.25, 0.75], density=1 / 3, majority_sign="total")
    expected = torch.tensor([
        [(0.25 * 3 + 0.75 * 2.5) / 1.0, 0.0, 0.0],  # both positive: the weighted mean 2.625
        [0.0, -3.0, (0.25 * -4 + 0.75 * -1) / 1.0],  # 2 vs -3: mass -1.75, b2 wins; -4 and -1 agree: -1.75
        [0.0, 0.0, 0.0],  # trimmed away in both
    ], dtype=torch.float64)
    torch.testing.assert_close(merged, expected)
    # the same weights the other way round: (1, 1) is 0.75·2 - 0.25·3 = +0.75, so A's 2 wins there
    swapped = combine("ties", [A, b2], [0.75, 0.25], density=1 / 3, majority_sign="total")
    assert swapped[1, 1] == 2.0 and swapped[0, 0] == pytest.approx((0.75 * 3 + 0.25 * 2.5) / 1.0)


def reference_election(vectors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES's election and weighted disjoint mean, entry by entry in plain Python (sign of Σ w·τ, ties positive)."""
    out = torch.zeros_like(vectors[0])
    for index in range(vectors[0].numel()):
        values = [float(v.reshape(-1)[index]) for v in vectors]
        mass = sum(w * x for w, x in zip(weights, values))
        sign = 1.0 if mass >= 0 else -1.0
        agree = [(w, x) for w, x in zip(weights, values) if x != 0 and math.copysign(1.0, x) == sign]
        total = sum(w for w, _ in agree)
        out.reshape(-1)[index] = sum(w * x for w, x in agree) / total if total > 0 else 0.0
    return out


def reference_trim(vector: torch.Tensor, density: float) -> torch.Tensor:
    flat = [float(x) for x in vector.reshape(-1)]
    keep = int(density * len(flat))
    kept = set(sorted(range(len(flat)), key=lambda i: -abs(flat[i]))[:keep])
    return torch.tensor([x if i in kept else 0.0 for i, x in enumerate(flat)], dtype=vector.dtype).reshape(
        vector.shape)


@pytest.mark.parametrize("density", [0.3, 0.7])
def test_ties_and_dare_ties_with_unequal_weights_against_a_plain_reference(density: float) -> None:
    """Random task vectors, unequal weights, real trimming: TIES against a reference written from the
    definition; DARE-TIES against the same reference applied to its drops (drawn as DARE draws them)."""
    vectors, weights = task_vectors(4, (5, 7), seed=3), [0.5, 0.1, 0.3, 0.1]
    expected = reference_election([reference_trim(v, density) for v in vectors], weights)
    torch.testing.assert_close(combine("ties", vectors, weights, density=density), expected)

    settings = merge_settings_from(dict(density=density, merge_seed=11))
    key = "encoder.block.1.layer.0.SelfAttention.v"
    generator = settings.generator(key)
    drops = [drop(v, density, generator) for v in vectors]
    assert any(float((d == 0).sum()) > 0 for d in drops)  # entries were dropped
    ours = MERGES["dare_ties"].combine(vectors, weights, settings, key)
    torch.testing.assert_close(ours, reference_election(drops, weights))


def test_dare_keeps_about_density_of_the_entries_and_preserves_the_mean() -> None:
    g = torch.Generator().manual_seed(0)
    big = torch.ones(200, 200, dtype=torch.float64)
    dropped = drop(big, 0.3, g)
    kept = dropped != 0
    assert abs(float(kept.double().mean()) - 0.3) < 0.01  # Bernoulli(0.3) over 40,000 entries
    assert torch.all(dropped[kept] == 1 / 0.3)  # the kept ones rescaled by 1/density
    assert abs(float(dropped.mean()) - 1.0) < 0.05  # so the expected value is the original's
    # on the 3x3 case, the same seed gives the same drops; another seed other drops
    s1, s2 = merge_settings_from(dict(density=0.5, merge_seed=1)), merge_settings_from(dict(density=0.5, merge_seed=2))
    one = MERGES["dare_linear"].combine([A, B], [0.5, 0.5], s1, "x")
    assert torch.equal(one, MERGES["dare_linear"].combine([A, B], [0.5, 0.5], s1, "x"))
    assert not torch.equal(one, MERGES["dare_linear"].combine([A, B], [0.5, 0.5], s2, "x"))
    # each entry is 0.5·(m_a·a + m_b·b)/0.5 for masks m in {0, 1}
    for i in range(3):
        for j in range(3):
            assert float(one[i, j]) in {0.0, float(A[i, j]), float(B[i, j]), float(A[i, j] + B[i, j])}


# --------------------------------------------------------------------------------------------------
# The driver: task vectors from each method's origin, lam, refusals


def ia3_like(values: list[float]) -> dict[str, torch.Tensor]:
    return {"encoder.block.0.layer.0.SelfAttention.k.loras.delta.lora_B": torch.tensor(values).reshape(-1, 1)}


def test_operators_merge_ia3_scalings_as_distances_from_one() -> None:
    """(IA)³'s task vector is θ - 1: trimming keeps the scalings that moved most from 1, and lam scales the move."""
    from models.methods import REGISTRY

    sources = [ia3_like([1.5, 1.0, 0.9, 1.0]), ia3_like([1.0, 0.2, 1.1, 1.0])]
    key = next(iter(sources[0]))
    fused, _ = fuse(sources, [0.5, 0.5], merge="magnitude_prune", method=REGISTRY["ia3"],
                    settings=merge_settings_from(dict(density=0.25)))  # one entry of four per source: 0.5 and -0.8
    torch.testing.assert_close(fused[key].reshape(-1), torch.tensor([1.25, 0.6, 1.0, 1.0]))
    fused, _ = fuse(sources, [0.5, 0.5], merge="task_arithmetic", method=REGISTRY["ia3"],
                    settings=merge_settings_from(dict(lam=2.0)))
    torch.testing.assert_close(fused[key].reshape(-1), torch.tensor([1.5, 0.2, 1.0, 1.0]))
    plain, _ = fuse(sources, [0.5, 0.5], method=REGISTRY["ia3"])  # the default: the plain average, exactly
    torch.testing.assert_close(plain[key], (sources[0][key] + sources[1][key]) / 2)


def test_lora_pairs_are_merged_as_delta_w() -> None:
    """A non-linear operator on LoRA acts on each pair's ΔW (then factored back); on the factors it is refused."""
    from models.methods import REGISTRY

    g = torch.Generator().manual_seed(0)
    base = "encoder.block.0.layer.0.SelfAttention.q.loras.delta"
    sources = [{f"{base}.lora_A": torch.randn(2, 6, generator=g), f"{base}.lora_B": torch.randn(6, 2, generator=g)}
               for _ in range(3)]
    fused, info = fuse(sources, [0.5, 0.3, 0.2], merge="ties", method=REGISTRY["lora"], lora_scaling=2.0,
                       settings=merge_settings_from(dict(density=1.0)))
    updates = [2.0 * s[f"{base}.lora_B"].double() @ s[f"{base}.lora_A"].double() for s in sources]
    target = elect_and_merge(updates, [0.5, 0.3, 0.2], "total")
    u, sv, vh = torch.linalg.svd(target)
    best = (u[:, :2] * sv[:2]) @ vh[:2]  # the best rank-2 approximation of the merged ΔW
    got = 2.0 * fused[f"{base}.lora_B"].double() @ fused[f"{base}.lora_A"].double()
    torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-5)
    assert info["lora_truncation_error"] == pytest.approx(float(torch.linalg.matrix_norm(target - best)
                                                                / torch.linalg.matrix_norm(target)), rel=1e-4)
    with pytest.raises(UserInputError, match="--merge ties with --lora_combine params"):
        fuse(sources, [0.5, 0.3, 0.2], merge="ties", method=REGISTRY["lora"], lora_combine="params")


@pytest.mark.parametrize("settings, message", [
    ({"density": 0.0}, "--density: expected a finite number in (0, 1], found 0.0"),
    ({"density": 1.5}, "--density: expected a finite number in (0, 1], found 1.5"),
    ({"lam": math.inf}, "--lam: expected a finite number, found inf"),
    ({"majority_sign": "median"}, "--majority_sign: expected one of total, frequency"),
    ({"merge_seed": 0.5}, "--merge_seed: expected an integer, found 0.5"),
])
def test_bad_settings_are_one_line_errors(settings: dict, message: str) -> None:
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        merge_settings_from(settings)


def test_the_settings_are_those_the_operators_declare_in_registry_order() -> None:
    from unit_model.merges import MERGE_SETTINGS

    assert list(MERGE_SETTINGS) == ["lam", "density", "majority_sign", "merge_seed"]
    declared = {s.name for op in MERGES.values() for s in op.settings}
    assert declared == {"density", "majority_sign", "merge_seed"}  # lam is the driver's, read for every one
    assert dict(merge_settings_from({})) == {"lam": 1.0, "density": 0.2, "majority_sign": "total", "merge_seed": 0}


def test_top_k_keeps_the_heaviest_and_renormalises() -> None:
    weights = {"a": {"model": 0.1}, "b": {"model": 0.5}, "c": {"model": 0.3}, "d": {"model": 0.1}}
    kept = keep_top_k(weights, 2)
    assert {s: w["model"] for s, w in kept.items()} == pytest.approx({"a": 0.0, "b": 0.625, "c": 0.375, "d": 0.0})
    assert keep_top_k(weights, 3)["a"]["model"] == pytest.approx(0.1 / 0.9)  # tie of a and d: a, named first
    assert keep_top_k(weights, 3)["d"]["model"] == 0.0
    assert keep_top_k(weights, 0) == weights and keep_top_k(weights, 9) == weights


@pytest.mark.parametrize("n, r, out, inp", [(3, 2, 12, 10), (5, 2, 10, 10), (2, 4, 30, 8)])
def test_the_qr_route_is_the_best_rank_r_approximation_like_the_dense_svd(n: int, r: int, out: int, inp: int) -> None:
    """Σ c_s B_s A_s factored through thin QRs and an (N·r)² SVD equals the dense route, and both are the
    best rank-r approximation (Eckart-Young): the same product, the same error, from the singular values."""
    from models.methods.lora import lora_factor
    from unit_model.merging import low_rank_weighted_sum

    g = torch.Generator().manual_seed(n * 100 + r)
    a = [torch.randn(r, inp, generator=g, dtype=torch.float64) for _ in range(n)]
    b = [torch.randn(out, r, generator=g, dtype=torch.float64) for _ in range(n)]
    scales, scaling = [0.5 * (i + 1) for i in range(n)], 2.0
    total = sum(c * bi @ ai for c, ai, bi in zip(scales, a, b))
    qr_b, qr_a, norm, err = low_rank_weighted_sum(a, b, scales, r, scaling)
    dense_b, dense_a = lora_factor(total, r, scaling)
    torch.testing.assert_close(scaling * qr_b @ qr_a, scaling * dense_b @ dense_a, rtol=1e-9, atol=1e-9)
    s = torch.linalg.svdvals(total)
    assert norm == pytest.approx(float(torch.linalg.matrix_norm(total)), rel=1e-10)
    assert err == pytest.approx(float(s[r:].square().sum().sqrt()), rel=1e-8, abs=1e-10)
    assert err == pytest.approx(float(torch.linalg.matrix_norm(total - scaling * qr_b @ qr_a)), rel=1e-6, abs=1e-9)
    if n * r <= min(out, inp):
        assert err > 0 or n * r <= r  # a sum of n > 1 rank-r terms is not rank r: the truncation is real
