"""nanoGPT-style parameter blocks: plain variables at the top of a script, each overridable as ``--name value``.

The fusion scripts (``unit_model/unit_model_*.py``) and ``study.py`` define their knobs as module globals;
``block_params(globals())`` collects them and ``build_parser`` gives each one a flag typed after its default.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
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
                 choices: Mapping[str, Sequence[str]] | None = None,
                 list_params: Sequence[str] = ()) -> argparse.ArgumentParser:
    """One ``--name`` per parameter, typed after its default; ``--help`` shows every default.

    ``helps`` and ``choices`` are per parameter; a parameter in ``list_params`` takes several words.
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
        if name in choices:
            kw["choices"] = choices[name]
        p.add_argument(f"--{name}", **kw)
    return p


def parse_params(params: Mapping[str, Any], argv: list[str] | None, description: str | None,
                 helps: Mapping[str, str] | None = None, choices: Mapping[str, Sequence[str]] | None = None,
                 list_params: Sequence[str] = ()) -> argparse.Namespace:
    """Parse ``argv`` against a parameter block; a list parameter comes back as one space-separated string."""
    args = build_parser(params, description, helps, choices, list_params).parse_args(argv)
    for name in list_params:
        if isinstance(getattr(args, name, None), list):
            setattr(args, name, " ".join(getattr(args, name)))
    return args
