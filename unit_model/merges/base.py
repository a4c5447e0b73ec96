"""What a merge operator is: a rule that combines the sources' task vectors of one tensor into one.

Operators see task vectors τ_s = θ_s - origin (``DeltaMethod.task_vector_origin``: 0, or 1 for (IA)³'s
scalings), one tensor at a time: a parameter tensor, or one LoRA pair's ΔW. The driver adds the origin back
and scales the merged vector by ``lam``. The helpers below are the pieces TIES and DARE are made of.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from utils.errors import UserInputError
from utils.ranges import FINITE, FRACTION, Range, check_value

if TYPE_CHECKING:  # torch is imported where a function needs it: the module loads without it
    import torch

MAJORITY_SIGNS = ("total", "frequency")


@dataclass(frozen=True)
class MergeSetting:
    """One setting an operator reads, declared once: the fusion flag, its default, its check and its help all
    come from here (``FusionConfig``, the fusion scripts' blocks, the study's block, the saved metadata)."""

    name: str  # the flag (--name) and the key of MergeSettings
    default: Any
    help: str
    rule: Range | None = None  # numbers: the valid range
    choices: tuple[str, ...] = ()  # words: the allowed values

    def check(self, value: Any) -> None:
        """A one-line error naming the flag when ``value`` is outside the declaration."""
        if self.choices:
            if value not in self.choices:
                raise UserInputError(f"--{self.name}: expected one of {', '.join(self.choices)}, found {value!r}")
        elif self.rule is not None:
            check_value(f"--{self.name}", value, self.rule)


# The driver's setting, read for every operator; the pieces below declare the ones they read.
LAM = MergeSetting("lam", 1.0, "scales the merged task vector: fused = origin + lam * merged (task arithmetic's "
                   "lambda)", FINITE)
DENSITY = MergeSetting("density", 0.2, "ties, dare_*, magnitude_prune: fraction of each tensor's entries kept, in "
                       "(0, 1]", FRACTION)
MAJORITY_SIGN = MergeSetting("majority_sign", "total", "ties, dare_ties: elect each entry's sign by total weighted "
                             "mass or by weighted count", choices=MAJORITY_SIGNS)


class MergeSettings(Mapping[str, Any]):
    """The values of the merge settings (``settings.density``, or ``settings["density"]``), read-only. Made once
    from the flags by ``unit_model.merges.merge_settings_from`` (every declared setting, checked) and passed down."""

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_values", dict(values))

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # never a setting: copy and pickle probe these before _values exists
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("MergeSettings is read-only")

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __hash__(self) -> int:
        return hash(tuple(self._values.items()))

    def __repr__(self) -> str:
        return f"MergeSettings({self._values!r})"

    def generator(self, key: str) -> torch.Generator:
        """A generator for tensor ``key``: a run's drops are reproducible and do not depend on tensor order."""
        import torch

        return torch.Generator().manual_seed(self.merge_seed + zlib.crc32(key.encode()))


# combine(vectors, weights, settings, key) -> merged: one tensor's task vectors (float64, one per source,
# same shape), the sources' weights for that tensor's parameter group, the settings and the tensor's name.
Combine = Callable[[Sequence["torch.Tensor"], Sequence[float], "MergeSettings", str], "torch.Tensor"]


@dataclass(frozen=True)
class MergeOperator:
    name: str
    combine: Combine
    summary: str
    # True when combine is Σ w·τ: the driver then adds one source at a time into an accumulator instead of
    # holding every source's copy of a tensor at once.
    linear: bool = False
    settings: tuple[MergeSetting, ...] = ()  # what it reads besides lam (the driver's, for every operator)


def weighted_sum(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    import torch

    total = torch.zeros_like(vectors[0], dtype=torch.float64)
    for v, w in zip(vectors, weights, strict=True):
        total.add_(v.to(torch.float64), alpha=float(w))
    return total


def trim(vector: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries largest in magnitude (int(density·n) of them), zero the rest."""
    import torch

    flat = vector.reshape(-1)
    keep = int(density * flat.numel())
    if keep >= flat.numel():
        return vector
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=keep, largest=True).indices] = 1
    return (flat * mask).reshape(vector.shape)


def drop(vector: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale the kept ones by 1/density."""
    import torch

    if density >= 1:
        return vector
    mask = torch.bernoulli(torch.full_like(vector, density), generator=generator)
    return vector * mask / density


def elect_and_merge(vectors: Sequence[torch.Tensor], weights: Sequence[float], majority_sign: str) -> torch.Tensor:
    """TIES's last two steps: elect a sign per entry, then the weighted mean over the sources that agree.

    The sign is that of Σ_s w_s τ_s (``total``) or of Σ_s w_s sign(τ_s) (``frequency``), positive on a tie; the
    merged entry is Σ_{s agrees} w_s τ_s / Σ_{s agrees} w_s (0 where no source agrees). With uniform weights
    this is TIES's disjoint mean.
    """
    import torch

    stacked = torch.stack([v.to(torch.float64) for v in vectors])
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64).reshape(-1, *([1] * (stacked.dim() - 1)))
    signs = stacked.sign()
    mass = (w * stacked).sum(0) if majority_sign == "total" else (w * signs).sum(0)
    elected = torch.where(mass >= 0, 1.0, -1.0).to(torch.float64)
    agrees = (signs == elected).to(torch.float64)
    weight_of_agreeing = (w * agrees).sum(0)
    merged = (w * agrees * stacked).sum(0)
    return torch.where(weight_of_agreeing > 0, merged / weight_of_agreeing.clamp_min(1e-300), 0.0)
