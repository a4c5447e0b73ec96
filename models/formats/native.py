"""This project's checkpoint format: a folder with ``delta_config.json`` (the meta) and ``delta.safetensors``.

Writing lives with the delta modules (``models.delta.save_delta_checkpoint``); this module reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from models.delta import CONFIG_FILE, FORMAT_VERSION, REQUIRED_META_KEYS, WEIGHTS_FILE
from utils.errors import UserInputError, first_line
from utils.io import read_json_object


def is_native_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def checked_meta(path: Path) -> dict[str, Any]:
    """The meta of a folder in this project's format (both files present), checked."""
    cfg_file = path / CONFIG_FILE
    weights_file = path / WEIGHTS_FILE
    if not cfg_file.is_file():
        raise UserInputError(f"{cfg_file}: missing (a delta checkpoint folder holds {CONFIG_FILE})")
    if not weights_file.is_file():
        raise UserInputError(f"{weights_file}: missing (a delta checkpoint folder holds {WEIGHTS_FILE})")
    meta = read_json_object(cfg_file)
    missing = [k for k in REQUIRED_META_KEYS if k not in meta]
    if missing:
        raise UserInputError(f"{cfg_file}: missing keys {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise UserInputError(
            f"{cfg_file}: format_version {meta['format_version']!r} not supported (expected {FORMAT_VERSION})"
        )
    for key in ("sizes", "backbone_fingerprint"):
        if not isinstance(meta[key], dict):
            raise UserInputError(f"{cfg_file}: expected '{key}' to be an object, found {meta[key]!r}")
    return meta


def invalid_weights(weights_file: Path, e: BaseException) -> UserInputError:
    return UserInputError(f"{weights_file}: not a valid safetensors file (truncated or corrupt?): {first_line(e)}")


def read_native(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta = checked_meta(path)
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise invalid_weights(path / WEIGHTS_FILE, e) from None
    return tensors, meta


def inspect_native(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """Names and shapes from the safetensors header alone (it must cover the whole file, so truncation shows)."""
    meta = checked_meta(path)
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise invalid_weights(path / WEIGHTS_FILE, e) from None
    return shapes, meta
