"""What every delta method declares, and the pieces that several methods share.

A method is one small subclass of ``DeltaMethod`` in its own file, registered by name in
``models/methods/__init__.py``. Everything that differs between methods lives on it: its AdapterHub
configuration, its sizes (declared here, read back from tensor shapes), its parameter groups, its neutral
state and its task vector (what fusion and weight-space scores operate on). The rest of the project asks
the registry and never branches on a method's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a function needs it: the registry loads without it
    import torch
    from torch import nn


from models.backbones import COUNT_KEYS, block_of, count_key
from utils.errors import UserInputError

DELTA_NAME = "delta"  # every module is added under this one name, so names match across tasks and runs
GRANULARITIES = ("model", "block", "layer")

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class SizeField:
    """One size of a method: a positive integer, one of ``choices``, or a comma-separated set drawn from ``subset_of``
    (written in that order)."""

    name: str
    help: str
    choices: tuple[str, ...] = ()
    # False for a size the tensors cannot tell (LoRA's alpha): it must come from a flag or saved args.
    in_shapes: bool = True
    hub_key: str | None = None  # where an AdapterHub config records a size the tensors cannot tell
    subset_of: tuple[str, ...] = ()
    # For a size added after modules were made: the value those modules have. A module at that value records no
    # entry for the field, so the identity and checkpoints of everything made before stay as they were.
    earlier: Any = None

    @property
    def kind(self) -> type:
        return str if self.choices or self.subset_of else int

    def normalise(self, value: Any) -> Any:
        """``value`` checked, in its one spelling (a set in ``subset_of``'s order)."""
        if self.subset_of:
            items = value.split(",") if isinstance(value, str) else None
            if not items or any(i not in self.subset_of for i in items) or len(set(items)) != len(items):
                raise UserInputError(f"--{self.name}: expected a comma-separated set of {', '.join(self.subset_of)}, "
                                     f"found {value!r}")
            return ",".join(i for i in self.subset_of if i in items)
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        if self.subset_of:
            self.normalise(value)
        elif self.choices:
            if value not in self.choices:
                raise UserInputError(f"--{self.name}: expected one of {', '.join(self.choices)}, found {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserInputError(f"--{self.name}: expected a positive integer, found {value!r}")


class DeltaMethod:
    """A delta method behind the registry. Subclasses set the class attributes and override what differs."""

    name: str = ""
    summary: str = ""  # one line for help texts
    size_fields: tuple[SizeField, ...] = ()
    storage: str = ""  # the sub-module under which AdapterHub keeps its weights: adapters, loras, prefix_tunings
    hub_architectures: tuple[Any, ...] = ()  # values of an AdapterHub config's 'architecture' field
    # A method whose weights sit in one pool reachable from every layer: the first path that reaches it, where
    # T5's named_parameters() lists it (a full state dict lists it under many paths).
    pool_home: str | None = None
    # The parameter value at which a tensor changes nothing, so that a module's task vector is θ - origin
    # (merge operators other than the weighted sum act on task vectors); None: the method has no such value
    # (a prefix always adds attention positions).
    task_vector_origin: float | None = 0.0

    # -- building ------------------------------------------------------------------------------------
    def library_config(self, sizes: Mapping[str, Any], d_model: int) -> Any:
        """The AdapterHub configuration that builds this method with ``sizes``."""
        raise NotImplementedError

    def check_built(self, model: nn.Module, sizes: Mapping[str, Any]) -> None:
        """Raise RuntimeError when the library built something other than ``sizes`` asked for."""

    def size(self, sizes: Mapping[str, Any], name: str) -> Any:
        """Size ``name`` of a module's recorded ``sizes``; a field left out is at its ``earlier`` value."""
        field = next(f for f in self.size_fields if f.name == name)
        return sizes.get(name, field.earlier)

    # -- reading back --------------------------------------------------------------------------------
    def owns(self, name: str) -> bool:
        """Whether parameter ``name`` belongs to this method's ``delta`` module."""
        return f".{self.storage}.{DELTA_NAME}." in name

    def holds(self, names: Any) -> bool:
        """Whether a module with exactly these parameter names is one of this method's."""
        names = list(names)
        return bool(names) and all(self.owns(n) for n in names)

    def sizes_from_shapes(self, shapes: Shapes, source: str) -> dict[str, Any]:
        """The sizes that tensor names and shapes determine (those with ``in_shapes``)."""
        return {}

    def layer_counts(self, shapes: Shapes, d_model: int) -> dict[str, int]:
        """The backbone's layer counts that the tensors reveal (part of a backbone fingerprint)."""
        counts: dict[str, int] = {}
        for found in filter(None, map(block_of, shapes)):
            key = count_key(found[0])
            counts[key] = max(counts.get(key, 0), found[1] + 1)
        return {key: counts[key] for key in COUNT_KEYS if key in counts}  # the backbone config's order

    def param_group(self, name: str, granularity: str) -> str:
        """Group of a parameter at ``block`` (encoder/decoder) or ``layer`` (``encoder.3``) granularity."""
        return block_group(name, granularity)

    # -- states ---------------------------------------------------------------------------------------
    def neutral_state(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """A state with the same names and shapes under which the module computes the identity, or None
        when the method has none (a prefix always adds attention positions)."""
        return None

    def factor_pairs(self, names: Any) -> dict[str, tuple[str, str]]:
        """Low-rank factor pairs, pair name -> (A key, B key); empty for a method without factors."""
        return {}

    def scaling(self, sizes: Mapping[str, Any]) -> float:
        """The constant by which B·A is multiplied in the forward pass (factored methods only)."""
        return 1.0

    def task_vector(self, tensors: Mapping[str, torch.Tensor], sizes: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """What the module does, independent of how its parameters express it. For factored methods each
        pair becomes its update ΔW = B·A·scaling (under the pair's name); other tensors stay as they are."""
        pairs = self.factor_pairs(tensors)
        paired = {k for pair in pairs.values() for k in pair}
        out = {k: v for k, v in tensors.items() if k not in paired}
        scale = self.scaling(sizes)
        for name, (a, b) in pairs.items():
            out[name] = pair_update(tensors[a], tensors[b], scale)
        return out


def pair_update(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """One factor pair's update ΔW = B·A·scaling, in float64."""
    return b.double() @ a.double() * scaling


def block_group(name: str, granularity: str) -> str:
    """``model``, the stack (``encoder``/``decoder``) or the layer (``encoder.3``) of a parameter in a block
    (a decoder-only backbone has the one stack ``decoder``)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: expected one of {', '.join(GRANULARITIES)}, found {granularity!r}")
    if granularity == "model":
        return "model"
    found = block_of(name)
    if found is None:
        raise ValueError(f"parameter {name!r} is not inside a layer of the backbone")
    return found[0] if granularity == "block" else f"{found[0]}.{found[1]}"


def one_size(shapes: Shapes, suffix: str, dim: int, what: str, source: str) -> int:
    """The one value of dimension ``dim`` across the tensors whose names end with ``suffix``."""
    sizes = {int(s[dim]) for k, s in shapes.items() if k.endswith(suffix) and len(s) > dim}
    if len(sizes) != 1:
        found = f"several ({sorted(sizes)})" if sizes else "none"
        raise UserInputError(f"{source}: expected one {what} across its *{suffix} tensors, found {found}")
    return sizes.pop()
