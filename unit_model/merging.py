"""The fusion driver: Σ-style merges of source modules, streamed so memory stays near two modules.

``fuse`` reads one source at a time. A linear merge adds each into a float64 accumulator; another merge
operator takes one tensor at a time with every source's copy of it. Methods with low-rank factors (LoRA)
are merged in task-vector space by default (``lora_combine="delta_w"``): each pair's ΔW = B·A·scaling is
merged, pair by pair (one out×in matrix per source alive at a time), and factored back to rank r by
truncated SVD, the best rank-r approximation (Eckart-Young). Its cost, the truncation error
‖Σ - B'A'‖_F / ‖Σ‖_F, is returned in ``info``. ``params`` merges the factors themselves, as the original
code did; it is close to ``delta_w`` only when all sources started from the same A and moved little. A pair
whose merged ΔW is exactly zero keeps the parameter merge, because zero factors would get zero gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from models.methods import DeltaMethod, method_of, param_group
from models.methods.base import pair_update
from models.methods.lora import lora_factor
from unit_model.config import DEFAULT_LORA_COMBINE, LORA_COMBINES
from unit_model.merges import DEFAULT_MERGE, MergeOperator, MergeSettings, get_merge, merge_settings_from
from unit_model.sources import ModuleSource, materialise, read_tensors
from utils.errors import UserInputError


def weight_by_group(weight: float | Mapping[str, float], groups: set[str], label: str) -> dict[str, float]:
    """A source's weight per parameter group (a single number applies to every group)."""
    by_group = {g: weight for g in groups} if isinstance(weight, int | float) else dict(weight)
    missing = sorted(groups - set(by_group))
    if missing:
        raise UserInputError(f"{label}: no weight for parameter group(s) {', '.join(missing)}")
    for g, w in by_group.items():
        if not isinstance(w, int | float) or not math.isfinite(w):
            raise UserInputError(f"{label}: weight of group {g} is {w!r}; expected a finite number")
    return {g: float(by_group[g]) for g in groups}


def low_rank_weighted_sum(a_factors: Sequence[torch.Tensor], b_factors: Sequence[torch.Tensor],
                          scales: Sequence[float], rank: int, scaling: float
                          ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-r factors of M = Σ_s c_s B_s A_s without forming M, and ‖M‖_F and ‖M - B'A'·scaling‖_F.

    M = [c_1 B_1 ... c_N B_N] · [A_1; ...; A_N] = Q_B (R_B R_A^T) Q_A^T with thin QR factorisations of the
    stacked factors (out × Nr and in × Nr); the SVD U S V^T of the (Nr × Nr) core gives M's own SVD,
    (Q_B U) S (Q_A V)^T, so its top r singular triplets are the best rank-r approximation (Eckart-Young) and
    the error is exact from the discarded singular values. Valid when N·r <= min(out, in) (the QR factors
    are then thin); the caller takes the dense route beyond.
    """
    stacked_b = torch.cat([b.to(torch.float64) * c for b, c in zip(b_factors, scales, strict=True)], dim=1)
    stacked_a = torch.cat([a.to(torch.float64) for a in a_factors], dim=0)
    q_b, r_b = torch.linalg.qr(stacked_b)
    q_a, r_a = torch.linalg.qr(stacked_a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    k = min(rank, s.numel())
    root = (s[:k] / scaling).sqrt()
    b = stacked_b.new_zeros(stacked_b.shape[0], rank)
    a = stacked_a.new_zeros(rank, stacked_a.shape[1])
    b[:, :k] = (q_b @ u[:, :k]) * root
    a[:k] = root[:, None] * (vh[:k] @ q_a.T)
    norm = float(s.square().sum().sqrt())
    err = float(s[k:].square().sum().sqrt())
    return b, a, norm, err


def check_merge(op: MergeOperator, settings: MergeSettings, method: DeltaMethod, lora_combine: str,
                names: Iterable[str]) -> None:
    """Refuse a merge that the method's modules cannot take, before anything is merged or written."""
    if not op.linear and method.task_vector_origin is None:
        raise UserInputError(f"--merge {op.name}: {method.name} modules have no task vector (no parameter "
                             "value at which they do nothing); only --merge linear merges them")
    if (not op.linear or settings.lam != 1) and lora_combine == "params" and method.factor_pairs(names):
        what = f"--merge {op.name}" if not op.linear else f"--lam {settings.lam:g}"
        raise UserInputError(f"{what} with --lora_combine params would act on LoRA's A and B factors "
                             "separately, which are not task vectors; use --lora_combine delta_w")


# Long by design: one streaming pass over the sources (linear accumulation, or every source's copy of one
# tensor at a time), then the LoRA pairs one at a time; the two share the accumulators they fill.
def fuse(
    sources: Iterable[ModuleSource],
    weights: Sequence[float | Mapping[str, float]],
    *,
    granularity: str = "model",
    lora_combine: str = DEFAULT_LORA_COMBINE,
    lora_scaling: float = 1.0,
    merge: str | MergeOperator = DEFAULT_MERGE,
    method: DeltaMethod | None = None,
    settings: MergeSettings | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Merge the sources (dicts, loaders, checkpoint paths or Modules) with ``weights``, streamed.

    ``weights[s]`` is a number or, per group, a mapping ``param_group(name, granularity) -> weight``; they are
    used as given (callers pass softmax weights, which sum to 1). ``method`` is told by the tensor names when
    not given. Factor pairs (``lora_combine="delta_w"``) are built in a second pass that reads only that
    pair's factors of each source, so ``sources`` must then be iterable twice; ``info`` holds
    ``lora_truncation_error`` (over the whole module) and its per-pair maximum.

    Every operator merges task vectors τ_s = θ_s - origin (the method's ``task_vector_origin``) and the result
    is origin + lam·merged (``settings``: lam, and each operator's own parameters). With the defaults (the
    weighted sum, lam 1, weights summing to 1) that is Σ w_s θ_s itself.
    """
    settings = settings if settings is not None else merge_settings_from({})  # the declared defaults
    if lora_combine not in LORA_COMBINES:
        raise UserInputError(f"--lora_combine: expected one of {', '.join(LORA_COMBINES)}, found {lora_combine!r}")
    op = get_merge(merge)
    weights = list(weights)
    if not weights:
        raise UserInputError("fuse: empty source list")
    if (lora_combine == "delta_w" or not op.linear) and iter(sources) is sources:
        raise TypeError("fuse: this merge reads the sources twice; pass a sequence (of paths, Modules or "
                        "loaders, to keep memory low), not a one-shot iterator")
    acc: dict[str, torch.Tensor] = {}
    ref: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    group_of: dict[str, str] = {}
    source_weights: list[dict[str, float]] = []
    for i, src in enumerate(sources):
        if i >= len(weights):
            raise ValueError(f"fuse: more sources than the {len(weights)} weights")
        tensors, label = materialise(src, i)
        del src  # hold no second reference: the accumulator plus this source is all that stays alive
        if i == 0:
            ref = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
            group_of = {k: param_group(k, granularity) for k in ref}
            method = method or method_of(ref, "fuse")
            check_merge(op, settings, method, lora_combine, ref)
            origin = method.task_vector_origin
            if op.linear:
                acc = {k: torch.zeros(shape, dtype=torch.float64) for k, (shape, _) in ref.items()}
        elif {k: tuple(v.shape) for k, v in tensors.items()} != {k: s for k, (s, _) in ref.items()}:
            raise UserInputError(f"{label}: tensor names or shapes differ from the first source's")
        else:  # computed in float64; written in the widest dtype of the sources, never the first one's alone
            ref = {k: (shape, torch.promote_types(dtype, tensors[k].dtype)) for k, (shape, dtype) in ref.items()}
        w = weight_by_group(weights[i], set(group_of.values()), label)
        source_weights.append(w)
        if op.linear:
            for k, v in tensors.items():
                acc[k].add_(v.to(torch.float64), alpha=w[group_of[k]])
        del tensors
    count = len(source_weights)
    if count != len(weights):
        raise ValueError(f"fuse: {count} sources for {len(weights)} weights")
    pairs: dict[str, tuple[str, str]] = {}
    if lora_combine == "delta_w":
        pairs = method.factor_pairs(ref)

    def gather(keys: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        return [read_tensors(src, keys, i) for i, src in zip(range(count), sources, strict=False)]

    def weights_of(key: str) -> list[float]:
        return [w[group_of[key]] for w in source_weights]

    def combine(vectors: Sequence[torch.Tensor], key: str) -> torch.Tensor:
        return op.combine(vectors, weights_of(key), settings, key)

    def from_task_vector(merged: torch.Tensor) -> torch.Tensor:  # origin + lam·merged
        scaled = merged if settings.lam == 1 else merged * settings.lam
        return scaled + origin if origin else scaled

    if op.linear:
        fused = {}
        for k, (_, dtype) in ref.items():
            total = acc.pop(k)  # Σ w θ = Σ w τ + origin·Σ w
            wsum = math.fsum(weights_of(k))
            if settings.lam != 1 or (origin and wsum != 1):
                total = from_task_vector(total - origin * wsum if origin else total)
            fused[k] = total.to(dtype)
    else:
        fused = {k: from_task_vector(combine([t[k].to(torch.float64) - origin if origin else t[k]
                                              for t in gather([k])], k)).to(dtype)
                 for k, (_, dtype) in ref.items()}
    info: dict[str, Any] = {}
    if not pairs:
        return fused, info
    err_sq = norm_sq = worst = 0.0
    for ka, kb in pairs.values():
        (rank, in_features), out_features = ref[ka][0], ref[kb][0][0]
        if op.linear and count * rank <= min(out_features, in_features):
            # the weighted sum's best rank-r factors from small QR and SVD factorisations, no out × in matrix
            factors = gather((ka, kb))
            scales = [source_weights[i][group_of[ka]] * lora_scaling * settings.lam for i in range(count)]
            b, a, norm, err = low_rank_weighted_sum([f[ka] for f in factors], [f[kb] for f in factors], scales,
                                                    rank, lora_scaling)
        else:
            # One pair at a time: its merged ΔW (out × in) is the only dense matrix kept.
            if op.linear:
                total = torch.zeros(ref[kb][0][0], ref[ka][0][1], dtype=torch.float64)
                for i, factors in enumerate(gather((ka, kb))):
                    total.addmm_(factors[kb].to(torch.float64), factors[ka].to(torch.float64),
                                 alpha=source_weights[i][group_of[ka]] * lora_scaling * settings.lam)
            else:  # ΔW is a task vector already (origin 0)
                total = combine([pair_update(f[ka], f[kb], lora_scaling) for f in gather((ka, kb))], ka)
                total = total * settings.lam
            norm = float(torch.linalg.matrix_norm(total))
            if norm > 0.0:
                b, a = lora_factor(total, rank, lora_scaling)
                err = float(torch.linalg.matrix_norm(total - pair_update(a, b, lora_scaling)))
        if norm == 0.0:
            continue  # keep the parameter merge: zero factors would never train
        fused[ka], fused[kb] = a.to(ref[ka][1]), b.to(ref[kb][1])
        err_sq, norm_sq, worst = err_sq + err**2, norm_sq + norm**2, max(worst, err / norm)
    info["lora_truncation_error"] = math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0
    info["lora_truncation_error_max"] = worst
    return fused, info


def linear_merge_graph(sources: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor,
                       group_of: Mapping[str, int], *, method: DeltaMethod, lora_combine: str = DEFAULT_LORA_COMBINE,
                       lam: float = 1.0) -> dict[str, torch.Tensor]:
    """The linear merge as a differentiable function of ``weights`` (sources × groups; ``group_of`` maps a tensor
    name to its column), for a gradient search through ``torch.func.functional_call``.

    Each tensor is origin + lam·Σ_s w_s (θ_s - origin), as ``fuse`` computes it. A LoRA pair under ``delta_w``
    becomes the stacked factors [A_1; ...; A_N] and [lam·w_1 B_1 ... lam·w_N B_N]: a rank-N·r pair whose update
    B·A·scaling is the merged ΔW exactly, where ``fuse`` then truncates it to rank r (so the two agree whenever
    the merged ΔW has rank r or less).
    """
    names = list(sources[0])
    pairs = method.factor_pairs(names) if lora_combine == "delta_w" else {}
    paired = {k for pair in pairs.values() for k in pair}
    origin = method.task_vector_origin or 0.0
    merged: dict[str, torch.Tensor] = {}
    for k in names:
        if k in paired:
            continue
        w = weights[:, group_of[k]].to(sources[0][k].dtype)
        stacked = torch.stack([src[k] for src in sources]) - origin
        merged[k] = origin + lam * torch.tensordot(w, stacked, dims=1)
    for ka, kb in pairs.values():
        w = weights[:, group_of[ka]].to(sources[0][kb].dtype)
        merged[ka] = torch.cat([src[ka] for src in sources], dim=0)
        merged[kb] = torch.cat([src[kb] * (lam * w[i]) for i, src in enumerate(sources)], dim=1)
    return merged
