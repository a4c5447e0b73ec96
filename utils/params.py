"""nanoGPT-style parameter blocks: plain variables at the top of a script, each overridable as ``--name value``.

The fusion scripts (``unit_model/unit_model_*.py``) and ``study.py`` define their knobs as module globals;
``block_params(globals())`` collects them and ``build_parser`` gives each one a flag typed after its default.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def block_params(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The plain variables (str, int, float, bool, None) of a script's globals, in definition order."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and (v is None or isinstance(v, str | int | float | bool))}


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, found {text!r}")


def build_parser(params: Mapping[str, Any], description: str | None, helps: Mapping[str, str] | None = None,
                 choices: Mapping[str, Sequence[str]] | None = None, list_params: Sequence[str] = (),
                 types: Mapping[str, Callable[[str], Any]] | None = None) -> argparse.ArgumentParser:
    """One ``--name`` per parameter, typed after its default; ``--help`` shows every default.

    ``helps`` and ``choices`` are per parameter; a parameter in ``list_params`` takes several words; ``types``
    overrides the type of a parameter whose values are not all of its default's type (``--tem auto``).
    """

    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    helps, choices = helps or {}, choices or {}
    p = argparse.ArgumentParser(description=description, formatter_class=Formatter)
    for name, default in params.items():
        kw: dict[str, Any] = {"default": default, "help": helps.get(name, " ")}
        if isinstance(default, bool):
            kw.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
        elif isinstance(default, int | float):
            kw["type"] = type(default)
        elif name in list_params:
            kw["nargs"] = "+"
        if types and name in types:
            kw["type"] = types[name]
        if name in choices:
            kw["choices"] = choices[name]
        p.add_argument(f"--{name}", **kw)
    return p


def parse_params(params: Mapping[str, Any], argv: list[str] | None, description: str | None,
                 helps: Mapping[str, str] | None = None, choices: Mapping[str, Sequence[str]] | None = None,
                 list_params: Sequence[str] = (),
                 types: Mapping[str, Callable[[str], Any]] | None = None) -> argparse.Namespace:
    """Parse ``argv`` against a parameter block; a list parameter comes back as one space-separated string."""
    args = build_parser(params, description, helps, choices, list_params, types).parse_args(argv)
    for name in list_params:
        if isinstance(getattr(args, name, None), list):
            setattr(args, name, " ".join(getattr(args, name)))
    return args


def flags_of(values: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> list[str]:
    """``--name value`` flags for a config's ``values`` (the inverse of argparse with dests named after fields).

    None is left out, True is a bare ``--name`` (store_true), False is left out, a list gives its items after
    one flag. A value equal to its entry in ``defaults`` is left out too, so the command line a job runs
    shows only what differs from the entry point's defaults (a field without a default is always written).
    """
    argv: list[str] = []
    for name, value in values.items():
        if value is None or value is False or (defaults is not None and name in defaults and defaults[name] == value):
            continue
        if value is True:
            argv.append(f"--{name}")
        elif isinstance(value, list | tuple):
            argv += [f"--{name}", *(repr(v) if isinstance(v, float) else str(v) for v in value)]
        else:
            argv += [f"--{name}", repr(value) if isinstance(value, float) else str(value)]
    return argv


def field_defaults(cls: type) -> dict[str, Any]:
    """A dataclass's field defaults (factories called), for ``parser.set_defaults``: one set of defaults."""
    from dataclasses import MISSING, fields

    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def config_from(cls: type, values: Any) -> Any:
    """A dataclass built from the attributes of the same names on ``values`` (e.g. parsed flags)."""
    from dataclasses import fields

    return cls(**{f.name: getattr(values, f.name) for f in fields(cls)})
