"""The arithmetic of the transferability estimators, on plain tensors (the scorer feeds them; tests check them).

* ``leep``: the label-agnostic score of Nguyen et al. (2020). The source-equipped model's distribution θ_i over
  its first answer token is read as a distribution over "dummy labels" z; the target's labels y enter only
  through the empirical joint P̂(y, z) = (1/n) Σ_{i: y_i = y} θ_i(z), so a source scores well when its first
  token *separates* the target's labels under any mapping, not when it already emits the right words:
  LEEP = (1/n) Σ_i log Σ_z P̂(y_i | z) θ_i(z). Higher is better; at most 0.
* ``logme``: LogME (You et al. 2021), the maximum over (α, β) of the log evidence of a Bayesian linear regression
  of each one-hot label column on the features, per example, averaged over the columns. The evidence of one
  column y is log N(y; 0, FFᵀ/α + I/β); LogME finds its maximum by the paper's fixed-point updates. With at
  least as many feature dimensions as examples (the few-shot case) the updates can run to β → ∞ (y fitted
  exactly); the supremum there, log N(y; 0, FFᵀ/α) at its best α, is then taken in closed form. Higher.
* ``arrow_alignment``: Arrow's prototype (Ostapenko et al. 2024) of a low-rank update ΔW = B·A·s is its top right
  singular vector v; its alignment with the target is the root-mean-square over the target's tokens of cos(v, h),
  h the base model's input to that projection, averaged over the projections. (Arrow routes a token by |⟨v, h⟩|;
  the root mean square of the cosine needs only each projection's d×d second moment of the target's inputs,
  not its tokens, and lets one batched product serve every layer.) Higher.
* ``gradient_alignment``: cos(-∇L_t, τ_s): how well a step along the source's task vector τ_s lowers the target's
  loss, to first order. ∇L_t is taken at the neutral module, in the space where the method's update is linear
  (ΔW for LoRA, the scale vectors for (IA)³). Higher.

The products run in the probe's precision (float32 from the scorer, float64 in the tests), every sum in float64.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch


def leep(first_logp: torch.Tensor, labels: Sequence[Hashable]) -> float:
    """LEEP of ``first_logp`` (n, V): each example's log-distribution over dummy labels, ``labels`` its target label."""
    if first_logp.ndim != 2 or first_logp.shape[0] != len(labels):
        raise ValueError(f"first_logp {tuple(first_logp.shape)} does not hold one row per label ({len(labels)})")
    if not labels:
        raise ValueError("no examples to score")
    theta = first_logp.double().exp()
    classes = {y: i for i, y in enumerate(dict.fromkeys(labels))}
    index = torch.tensor([classes[y] for y in labels])
    joint = torch.zeros(len(classes), theta.shape[1], dtype=torch.float64).index_add_(0, index, theta) / len(labels)
    marginal = joint.sum(0)  # P̂(z)
    conditional = joint / marginal.clamp_min(torch.finfo(torch.float64).tiny)  # P̂(y | z); 0 where P̂(z) = 0
    expected = (conditional[index] * theta).sum(1)  # Σ_z P̂(y_i | z) θ_i(z)
    return float(expected.log().mean())


def logme(features: torch.Tensor, labels: Sequence[Hashable], tolerance: float = 1e-9, max_steps: int = 1000) -> float:
    """LogME of ``features`` (n, d) for the class ``labels`` (one per row): the mean over the one-hot columns of
    the maximised log evidence per example."""
    f = features.double()
    if f.ndim != 2 or f.shape[0] != len(labels):
        raise ValueError(f"features {tuple(f.shape)} do not hold one row per label ({len(labels)})")
    classes = list(dict.fromkeys(labels))
    if len(classes) < 2:
        raise ValueError("LogME needs at least two classes among the examples")
    values = [column_evidence(f, torch.tensor([float(y == c) for y in labels], dtype=torch.float64),
                              tolerance, max_steps)[0] for c in classes]
    return math.fsum(values) / len(values)


def column_evidence(f: torch.Tensor, y: torch.Tensor, tolerance: float = 1e-9,
                    max_steps: int = 1000) -> tuple[float, float, float]:
    """(log evidence / n, α, β) of one target column ``y`` at the fixed point of LogME's updates."""
    n, d = f.shape
    u, s_t, _ = torch.linalg.svd(f.double(), full_matrices=False)
    s = s_t.numpy()
    sigma = s ** 2  # eigenvalues of FᵀF on its row space; the other d - len(s) are 0
    projected = (u.T @ y.double()).numpy()  # y in the left singular basis
    outside = max(float(y.double() @ y.double()) - float(projected @ projected), 0.0)  # what no feature reaches

    def fit(alpha: float, beta: float) -> tuple[float, float, float]:
        """(γ, ‖m‖², ‖F m - y‖²) at (α, β), m = β (αI + βFᵀF)⁻¹ Fᵀ y the posterior mean."""
        shrink = beta * sigma / (alpha + beta * sigma)
        m_sq = float(((beta * s * projected / (alpha + beta * sigma)) ** 2).sum())
        return float(shrink.sum()), m_sq, float((((1 - shrink) * projected) ** 2).sum()) + outside

    alpha, beta = 1.0, 1.0
    for _ in range(max_steps):
        gamma, m_sq, residual = fit(alpha, beta)
        if residual <= 1e-12 * float(y.double() @ y.double()) and len(s) == n and s.min() > 0:
            return noiseless_evidence(sigma, projected, alpha)
        if alpha > 1e12 * beta * max(float(sigma.max()), 1e-300):  # α → ∞: the features explain nothing
            return noise_only_evidence(y, n)
        new_alpha, new_beta = gamma / max(m_sq, 1e-300), (n - gamma) / max(residual, 1e-300)
        converged = abs(new_alpha - alpha) <= tolerance * alpha and abs(new_beta - beta) <= tolerance * beta
        alpha, beta = new_alpha, new_beta
        if converged:
            break
    _, m_sq, residual = fit(alpha, beta)
    log_det = float(np.log(alpha + beta * sigma).sum()) + (d - len(s)) * math.log(alpha)  # log|αI + βFᵀF|
    evidence = (n / 2 * math.log(beta) + d / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
                - beta / 2 * residual - alpha / 2 * m_sq - log_det / 2)
    return evidence / n, alpha, beta


def noiseless_evidence(sigma: np.ndarray, projected: np.ndarray, alpha: float) -> tuple[float, float, float]:
    """(log evidence / n, α, ∞) at the edge β → ∞, where the updates go when the n examples' features have full rank
    n (d ≥ n, so some weights fit y exactly and the noise precision grows without bound). The evidence there is
    log N(y; 0, FFᵀ/α), largest at α = n / yᵀ(FFᵀ)⁻¹y; FFᵀ = U diag(σ) Uᵀ in the SVD's basis."""
    n = len(sigma)
    quadratic = float((projected ** 2 / sigma).sum())  # yᵀ (FFᵀ)⁻¹ y
    alpha = n / quadratic if quadratic > 0 else alpha
    evidence = (-n / 2 * math.log(2 * math.pi) - float(np.log(sigma).sum()) / 2 + n / 2 * math.log(alpha)
                - alpha / 2 * quadratic)
    return evidence / n, alpha, math.inf


def noise_only_evidence(y: torch.Tensor, n: int) -> tuple[float, float, float]:
    """(log evidence / n, ∞, β) at the edge α → ∞, where the updates go when no weight explains y better than
    noise: the evidence there is log N(y; 0, I/β), largest at β = n / ‖y‖²."""
    sq = float(y.double() @ y.double())
    beta = n / sq if sq > 0 else 1.0
    return (-n / 2 * math.log(2 * math.pi) + n / 2 * math.log(beta) - beta / 2 * sq) / n, math.inf, beta


@dataclass
class Update:
    """One part of a source's task vector: a low-rank pair ΔW = B·A·scale (``a``, ``b``) or a plain ``tensor``
    (θ minus the method's neutral value). The pair is never multiplied out."""

    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    scale: float = 1.0
    tensor: torch.Tensor | None = None

    def inner(self, g: torch.Tensor) -> float:
        """⟨g, ΔW⟩ = scale · Σ (Bᵀ g) ⊙ A, or ⟨g, τ⟩."""
        if self.tensor is not None:
            return float((g.double() * self.tensor.double()).sum())
        return self.scale * float(((self.b.double().T @ g.double()) * self.a.double()).sum())

    def squared_norm(self) -> float:
        """‖ΔW‖²_F = scale² · tr((BᵀB)(AAᵀ)), or ‖τ‖²."""
        if self.tensor is not None:
            return float(self.tensor.double().pow(2).sum())
        a, b = self.a.double(), self.b.double()
        return self.scale ** 2 * float(((b.T @ b) * (a @ a.T)).sum())


class Probe(dict):
    """A target probe, part -> tensor, that keeps the float64 stack of each set of parts it was asked for: every
    source is compared with the same probe, so its stacks are built once per target, not once per source."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stacks: dict[tuple[str, ...], torch.Tensor] = {}

    def stack(self, names: list[str]) -> torch.Tensor:
        key = tuple(names)
        if key not in self.stacks:
            self.stacks[key] = torch.stack([self[k] for k in names])
        return self.stacks[key]


def stacked(probe: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """The stack of ``probe``'s parts ``names`` (kept by a Probe, built anew from a plain mapping)."""
    return probe.stack(names) if isinstance(probe, Probe) else torch.stack([probe[k] for k in names])


def low_rank_stacks(updates: Mapping[str, Update]) -> list[tuple[list[str], torch.Tensor, torch.Tensor, float]]:
    """The low-rank parts grouped by shape and scale, each group stacked: (names, A (P, r, in), B (P, out, r),
    scale), so that one batched operation serves every layer of a shape."""
    groups: dict[tuple, list[str]] = {}
    for k, u in updates.items():
        if u.tensor is None:
            groups.setdefault((tuple(u.a.shape), tuple(u.b.shape), u.scale), []).append(k)
    return [(names, torch.stack([updates[k].a for k in names]), torch.stack([updates[k].b for k in names]), key[2])
            for key, names in groups.items()]


def gradient_alignment(gradient: Mapping[str, torch.Tensor], updates: Mapping[str, Update]) -> float:
    """cos(-g, τ) over the parts both name: g the target's loss gradient, τ the source's task vector (0 when
    either is zero)."""
    shared = {k: u for k, u in updates.items() if k in gradient}
    if not shared:
        raise ValueError("the gradient and the task vector share no part")
    inner, g_sq, t_sq = [], [], []
    for names, a, b, scale in low_rank_stacks(shared):  # ⟨g, ΔW⟩ and ‖ΔW‖² from the factors, batched
        g = stacked(gradient, names)
        a, b = a.to(g.dtype), b.to(g.dtype)
        inner.append(-scale * float((torch.bmm(b.transpose(1, 2), g) * a).double().sum()))
        t_sq.append(scale ** 2 * float((torch.bmm(b.transpose(1, 2), b) * torch.bmm(a, a.transpose(1, 2)))
                                       .double().sum()))
        g_sq.append(float(g.double().pow(2).sum()))
    for k, u in shared.items():
        if u.tensor is not None:
            inner.append(-u.inner(gradient[k]))
            t_sq.append(u.squared_norm())
            g_sq.append(float(gradient[k].double().pow(2).sum()))
    g_norm, t_norm = math.sqrt(math.fsum(g_sq)), math.sqrt(math.fsum(t_sq))
    return math.fsum(inner) / (g_norm * t_norm) if g_norm > 0 and t_norm > 0 else 0.0


def top_directions(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The top right singular vector of each B_p·A_p (P, in), from the small factors only: Aᵀ = Q R, so
    B·A = (B Rᵀ) Qᵀ, and the top right singular vector of M = B Rᵀ (the top eigenvector of the r×r MᵀM) mapped
    through Q is ΔW's. Its sign is arbitrary, as a singular vector's is."""
    q, r = torch.linalg.qr(a.transpose(1, 2))
    m = torch.bmm(b, r.transpose(1, 2))
    _, vectors = torch.linalg.eigh(torch.bmm(m.transpose(1, 2), m))  # MᵀM's eigenvectors, ascending eigenvalues
    return torch.bmm(q, vectors[:, :, -1:])[..., 0]


def arrow_alignment(second_moments: Mapping[str, torch.Tensor], updates: Mapping[str, Update]) -> float:
    """Mean over the low-rank parts of the root-mean-square cosine between the part's prototype v (the top right
    singular vector of ΔW) and the target's inputs h to its projection: sqrt(vᵀ C v), where
    C = mean_t h_t h_tᵀ / ‖h_t‖² (``second_moments[k]``, input_second_moment)."""
    shared = {k: u for k, u in updates.items() if k in second_moments and u.tensor is None}
    if not shared:
        raise ValueError("no low-rank part of the source has target inputs")
    values = []
    for names, a, b, _ in low_rank_stacks(shared):
        c = stacked(second_moments, names)
        v = top_directions(a.to(c.dtype), b.to(c.dtype))
        quadratic = (torch.bmm(c, v[..., None])[..., 0] * v).double().sum(-1)  # vᵀ C v per part
        values.extend(quadratic.clamp_min(0).sqrt().tolist())
    return math.fsum(values) / len(values)


def input_second_moment(inputs: torch.Tensor) -> torch.Tensor:
    """mean_t h_t h_tᵀ / ‖h_t‖² of token inputs (tokens, d), so that vᵀ C v is the mean squared cosine with v."""
    rows = unit_rows(inputs)
    return rows.T @ rows / max(rows.shape[0], 1)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (a zero row stays zero)."""
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)
