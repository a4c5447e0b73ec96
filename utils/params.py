"""nanoGPT-style parameter blocks: plain variables at the top of a script, each overridable as ``--name value``.

The fusion scripts (``unit_model/unit_model_*.py``) and ``study.py`` define their knobs as module globals;
``block_params(globals())`` collects them and ``build_parser`` gives each one a flag typed after its default.

A relative path written in a block resolves against the repository root, wherever the script is run from
(``cd unit_model && python unit_model_average.py`` reads and writes what ``python unit_model/...`` does); a
path given on the command line resolves against the current directory, as any command line's does.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# Parameters that hold a path: these suffixes, and these names. ``model`` may also be a hub id, so it resolves
# against the repository root only where that folder exists there.
PATH_SUFFIXES = ("_path", "_dir", "_tsv", "_library")
PATH_NAMES = ("output", "export_peft", "model", "tokenizer_path")


class BadBlockValue:
    """A block variable of a type no flag takes (a list, a dict, ...): refused when the block is parsed."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


HELP_KEY = "__help__"  # block_params' entry holding the block's comments (no parameter starts with "_")


def block_comments(path: str | Path) -> dict[str, str]:
    """Each parameter's comment in a block (between ``# ---- parameters`` and the next ``# -----`` line): its
    inline comment, else the comment lines right above it."""
    import re

    helps: dict[str, str] = {}
    inside, above = False, []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# ---- parameters"):
            inside = True
            continue
        if not inside:
            continue
        if line.startswith("# -----"):
            break
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"^(\w+)\s*=.*?(?:\s#\s*(.*))?$", line)
        if match:
            helps[match.group(1)] = (match.group(2) or "").strip() or " ".join(above)
        above = []
    return {k: v for k, v in helps.items() if v}


def block_params(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The plain variables (str, int, float, bool, None) of a script's globals, in definition order, and under
    ``HELP_KEY`` the block's comments (the flags' help).

    A list, tuple, set or dict is kept as a ``BadBlockValue`` so that parsing refuses it in one line (a list of
    targets would otherwise be silently dropped and every task fused).
    """
    out: dict[str, Any] = {}
    if isinstance(namespace.get("__file__"), str) and Path(namespace["__file__"]).is_file():
        out[HELP_KEY] = block_comments(namespace["__file__"])
    for k, v in namespace.items():
        if k.startswith("_"):
            continue
        if v is None or isinstance(v, str | int | float | bool):
            out[k] = v
        elif isinstance(v, list | tuple | set | dict) and not k.isupper():  # upper case: an imported constant
            out[k] = BadBlockValue(v)
    return out


def is_path_param(name: str) -> bool:
    return name in PATH_NAMES or name.endswith(PATH_SUFFIXES)


def from_repo_root(name: str, value: Any) -> Any:
    """A block's relative path, made absolute against the repository root (``model`` only where it exists)."""
    if not isinstance(value, str) or not value or not is_path_param(name) or Path(value).expanduser().is_absolute():
        return value
    resolved = REPO_ROOT / value
    if name == "model" and not resolved.exists():
        return value  # a hub id, or a folder that is not there: the backbone loader says which
    return str(resolved)


def check_block(params: Mapping[str, Any]) -> None:
    """Refuse a block variable whose form no flag takes, naming it and the form expected."""
    from utils.errors import UserInputError

    for name, value in params.items():
        if isinstance(value, BadBlockValue):
            raise UserInputError(f"parameter block: {name} = {value!r} is a {type(value.value).__name__}; write it "
                                 f"as one string of words, e.g. {name} = \"{' '.join(map(str, value.value))}\"")


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, found {text!r}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default, once (a help text that states its own default is left as is)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.default in (None, argparse.SUPPRESS) or action.option_strings == []:
            return text
        if action.default == "":
            return f"{text} (default: empty)"
        return super()._get_help_string(action)


def build_parser(params: Mapping[str, Any], description: str | None, helps: Mapping[str, str] | None = None,
                 choices: Mapping[str, Sequence[str]] | None = None, list_params: Sequence[str] = (),
                 types: Mapping[str, Callable[[str], Any]] | None = None) -> argparse.ArgumentParser:
    """One ``--name`` per parameter, typed after its default; ``--help`` shows every default.

    ``helps`` and ``choices`` are per parameter; a parameter in ``list_params`` takes several words; ``types``
    overrides the type of a parameter whose values are not all of its default's type (``--tem auto``).
    """

    helps, choices = helps or {}, choices or {}
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    for name, default in params.items():
        if isinstance(default, BadBlockValue):
            default = " ".join(map(str, default.value))
        kw: dict[str, Any] = {"default": default, "help": helps.get(name, name.replace("_", " "))}
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
    """Parse ``argv`` against a parameter block; a list parameter comes back as one space-separated string.

    Block values are checked first (``check_block``), and the block's relative paths resolve against the
    repository root (``from_repo_root``); values given on the command line are taken as they are.
    """
    params = dict(params)
    comments = params.pop(HELP_KEY, {})
    check_block(params)
    helps = {**(helps or {}), **comments}  # the block's own comment says most about its parameter
    parser = build_parser(params, description, helps, choices, list_params, types)
    args = parser.parse_args(argv)
    # The flags argv gave, as argparse itself matched them (prefixes, --name=value): parsed again into a namespace
    # that already holds a marker for every parameter, argparse replaces only the markers of the given ones.
    unset = object()
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(params, unset)))
    given = {name for name in params if getattr(probe, name) is not unset}
    for name in params:
        if name not in given and hasattr(args, name):
            setattr(args, name, from_repo_root(name, getattr(args, name)))
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


def first_difference(made: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
    """The first setting (in name order) on which two recorded settings differ, or None when they are the same:
    what a resumed run names when it refuses outputs made with other settings."""
    differ = [k for k in sorted(set(made) | set(wanted)) if made.get(k) != wanted.get(k)]
    return differ[0] if differ else None


def field_defaults(cls: type, names: Sequence[str] | None = None) -> dict[str, Any]:
    """A dataclass's field defaults (factories called), for ``parser.set_defaults``: one set of defaults. With
    ``names``, only those fields, in that order."""
    from dataclasses import MISSING, fields

    out = {}
    by_name = {f.name: f for f in fields(cls)}
    for f in (by_name[n] for n in names) if names is not None else fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def config_from(cls: type, values: Any) -> Any:
    """A dataclass built from the attributes of the same names on ``values`` (e.g. parsed flags)."""
    from dataclasses import fields

    return cls(**{f.name: getattr(values, f.name) for f in fields(cls)})
