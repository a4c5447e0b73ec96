"""Valid ranges of settings, declared once on each typed configuration's fields and checked by one function.

A field declares its range with ``setting(default, POSITIVE_INT)``; ``check_ranges(config)`` walks the fields of
any such dataclass (lists element by element) before an entry point reads a model or writes a file, so the same
value gets the same one-line answer from every entry point. A parameter block (study.py) that is not a dataclass
passes its own ``{name: Range}`` mapping.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from typing import Any

from utils.errors import UserInputError

RANGE_KEY = "range"


@dataclass(frozen=True)
class Range:
    """Numbers from ``low`` to ``high`` (open ends where said), integers only with ``integer``; every number
    must be finite. ``special`` values (``None``, ``"auto"``) are accepted as they are."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    special: tuple = ()

    def accepts(self, value: Any) -> bool:
        if any(value is s or (isinstance(s, str) and value == s) for s in self.special):
            return True
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def allowing(self, *special: Any) -> Range:
        """This range, with ``special`` values (``None``, ``"auto"``) accepted as they are besides."""
        return replace(self, special=special)

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low == 0 and self.high is None:
            kind = ("a positive integer" if self.integer else "a positive finite number") if self.low_open else \
                ("zero or a positive integer" if self.integer else "zero or a positive finite number")
        elif self.low is not None or self.high is not None:
            left = "(" if self.low_open or self.low is None else "["
            right = ")" if self.high_open or self.high is None else "]"
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            kind = f"{kind} in {left}{low}, {high}{right}"
        named = [repr(s) if isinstance(s, str) else str(s) for s in self.special if s is not None]
        return " or ".join([*named, kind])


POSITIVE_INT = Range(low=0, low_open=True, integer=True)
NON_NEGATIVE_INT = Range(low=0, integer=True)
POSITIVE = Range(low=0, low_open=True)
NON_NEGATIVE = Range(low=0)
FINITE = Range()
FRACTION = Range(low=0, high=1, low_open=True)  # (0, 1]
ANY_INT = Range(integer=True)


def setting(default: Any = MISSING, rule: Range | Pattern | None = None, *,
            factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A dataclass field with a default (or ``factory``) and its valid range."""
    return field(default=default, default_factory=factory, metadata={RANGE_KEY: rule})


def ranges_of(cls_or_config: Any) -> dict[str, Range | Pattern]:
    """The declared range of each field of a dataclass (fields without one are left out)."""
    return {f.name: f.metadata[RANGE_KEY] for f in fields(cls_or_config) if f.metadata.get(RANGE_KEY)}


def check_value(flag: str, value: Any, rule: Range | Pattern) -> None:
    """One value (or each item of a list) against its range; a refusal names the flag and the value."""
    for item in value if isinstance(value, list | tuple) else [value]:
        if not rule.accepts(item):
            raise UserInputError(f"{flag}: expected {rule.describe()}, found {item!r}")


def check_ranges(config: Any, rules: Mapping[str, Range | Pattern] | None = None,
                 flag: Callable[[str], str] = lambda name: f"--{name}") -> None:
    """Every field of ``config`` (a dataclass, or a mapping with ``rules``) against its declared range."""
    if rules is None:
        if not is_dataclass(config):
            raise TypeError("check_ranges: pass the rules of a config that is not a dataclass")
        rules = ranges_of(config)
    values = config if isinstance(config, Mapping) else vars(config)
    for name, rule in rules.items():
        if name in values:
            check_value(flag(name), values[name], rule)


@dataclass(frozen=True)
class Pattern:
    """Text that must match ``regex`` in full (e.g. a device name), described as ``description``."""

    regex: str
    description: str

    def accepts(self, value: Any) -> bool:
        import re

        return isinstance(value, str) and re.fullmatch(self.regex, value) is not None

    def describe(self) -> str:
        return self.description


DEVICE = Pattern(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda or cuda:N")
