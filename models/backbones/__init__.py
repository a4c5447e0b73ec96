"""The backbone families, one file each, behind one registry.

To add a family: write ``models/backbones/<name>.py`` with a ``BackboneFamily`` subclass (its model class,
config numbers, batch layout, logit alignment, generation and layer pattern) and register it on the
``FAMILIES`` line below. ``config.json``'s ``model_type`` picks the family.
"""

from __future__ import annotations

from typing import Any

from models.backbones.base import IGNORE_INDEX, BackboneFamily, token_logp
from models.backbones.causal import Causal
from models.backbones.seq2seq import Seq2Seq
from utils.errors import UserInputError

FAMILIES: dict[str, BackboneFamily] = {f.name: f for f in (Seq2Seq(), Causal())}
COUNT_KEYS = tuple(dict.fromkeys(k for f in FAMILIES.values() for k in f.stacks.values()))  # layer-count keys

__all__ = ["COUNT_KEYS", "FAMILIES", "IGNORE_INDEX", "BackboneFamily", "block_of",
           "count_key", "family_for_type", "family_of", "family_of_names", "lora_location",
           "supported_model_types", "token_logp"]


def supported_model_types() -> tuple[str, ...]:
    """Every model_type some registered family loads."""
    return tuple(t for f in FAMILIES.values() for t in f.model_types)


def family_for_type(model_type: Any, where: str = "--model") -> BackboneFamily:
    """The family that loads ``model_type``; another architecture is refused by name."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise UserInputError(f"{where}: a {model_type or 'model of unknown type'} model (model_type {model_type!r}); "
                         f"supported: {', '.join(supported_model_types())}")


def family_of(model_or_config: Any) -> BackboneFamily:
    """The family of a loaded model (or of its config)."""
    config = getattr(model_or_config, "config", model_or_config)
    return family_for_type(getattr(config, "model_type", None), "model")


def block_of(name: str) -> tuple[str, int] | None:
    """(stack, layer index) of a parameter inside a layer of any family, else None (names do not overlap)."""
    for family in FAMILIES.values():
        found = family.block_of(name)
        if found is not None:
            return found
    return None


def lora_location(module: str, source: str) -> str:
    """The LoRA location (models/methods/lora.py) that reaches projection ``module`` in any family; else one line."""
    for family in FAMILIES.values():
        if module in family.lora_modules:
            return family.lora_modules[module]
    reachable = ", ".join(dict.fromkeys(m for f in FAMILIES.values() for m in f.lora_modules))
    raise UserInputError(f"{source}: a LoRA of {module!r}, which AdapterHub's LoRA does not reach (it reaches "
                         f"{reachable})")


def family_of_names(names: Any) -> BackboneFamily:
    """The family whose layer names these parameter names are (the first one inside a layer decides)."""
    for name in names:
        for family in FAMILIES.values():
            if family.block_of(name) is not None:
                return family
    raise UserInputError(f"no parameter name tells the backbone family (e.g. {next(iter(names), None)!r})")


def count_key(stack: str) -> str:
    """The fingerprint's layer-count key of a stack name."""
    for family in FAMILIES.values():
        if stack in family.stacks:
            return family.stacks[stack]
    raise ValueError(f"unknown stack {stack!r}")
