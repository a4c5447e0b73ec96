"""The delta methods, one file each, behind one registry.

To add a method: write ``models/methods/<name>.py`` with a ``DeltaMethod`` subclass (its AdapterHub config,
its sizes, how to read them back from tensor shapes, and what differs in groups, neutral state or task
vector), register it on the ``METHODS`` line below, and give its sizes in ``models/sizes.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from models.methods.adapter import Adapter
from models.methods.base import DELTA_NAME, GRANULARITIES, DeltaMethod, SizeField, block_group
from models.methods.ia3 import IA3
from models.methods.lora import LoRA
from models.methods.prefix import Prefix
from utils.errors import UserInputError

REGISTRY: dict[str, DeltaMethod] = {m.name: m for m in (Adapter(), LoRA(), Prefix(), IA3())}
METHODS = tuple(REGISTRY)
SIZE_FLAGS = tuple(f.name for m in REGISTRY.values() for f in m.size_fields)  # every method's size names
# Sizes added after modules and studies were made: the value those have, where they record none.
EARLIER_SIZES = {f.name: f.earlier for m in REGISTRY.values() for f in m.size_fields if f.earlier is not None}

__all__ = ["DELTA_NAME", "EARLIER_SIZES", "GRANULARITIES", "METHODS", "REGISTRY", "SIZE_FLAGS", "DeltaMethod",
           "SizeField", "add_size_flags", "block_group", "get_method", "method_of", "owner", "param_group"]


def get_method(name: str, flag: str = "--method") -> DeltaMethod:
    """The registered method ``name``; an unknown name is refused with the known ones."""
    if name not in REGISTRY:
        raise UserInputError(f"{flag}: expected one of {', '.join(METHODS)}, found {name!r}")
    return REGISTRY[name]


def owner(name: str) -> DeltaMethod | None:
    """The method whose delta module holds parameter ``name`` (None for a backbone parameter)."""
    return next((m for m in REGISTRY.values() if m.owns(name)), None)


def method_of(names: Iterable[str], source: str) -> DeltaMethod:
    """The one method that holds every one of ``names``; a mix or a stranger is refused."""
    names = sorted(names)
    stranger = next((n for n in names if owner(n) is None), None)
    if stranger is not None:
        raise UserInputError(f"{source}: {stranger!r} is not a parameter of a {DELTA_NAME!r} delta module")
    matches = [m for m in REGISTRY.values() if m.holds(names)]
    if len(matches) != 1:
        found = sorted({owner(n).name for n in names})
        raise UserInputError(f"{source}: holds parameters of several delta methods ({', '.join(found)}); "
                             "this project loads one")
    return matches[0]


def param_group(name: str, granularity: str) -> str:
    """Group of a delta parameter at ``model``, ``block`` or ``layer`` granularity, as its method defines it."""
    m = owner(name)
    return (m.param_group if m is not None else block_group)(name, granularity)


def add_size_flags(group: Any, defaults: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Add ``--<size>`` for every size of every registered method to an argparse group; return their names.

    ``defaults`` maps method -> size -> value (a profile of models/sizes.py); None leaves every flag at None,
    for commands that read the sizes from a file and only check the flags given.
    """
    for spec in REGISTRY.values():
        for f in spec.size_fields:
            default = None if defaults is None else defaults[spec.name][f.name]
            extra = {"choices": f.choices} if f.choices else {}
            group.add_argument(f"--{f.name}", type=f.kind, default=default, help=f"{spec.name}: {f.help}", **extra)
    return list(SIZE_FLAGS)
