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
    """Names and shapes from the safetensors header (it must cover the whole file, so truncation shows); the
    tensors are read once and dropped, to refuse a non-finite one before the caller writes anything."""
    meta = checked_meta(path)
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise invalid_weights(path / WEIGHTS_FILE, e) from None
    wrong = next((k for k, d in dtypes.items() if d not in FLOAT_DTYPES), None)
    if wrong is not None:
        raise UserInputError(f"{path}: tensor {wrong} is of dtype {dtypes[wrong]}; a delta module's tensors must "
                             "be floating point")
    check_finite(path)
    return shapes, meta


def check_finite(path: Path) -> None:
    """Read the tensors once, to refuse a module with a NaN or an infinity up front (they are not kept)."""
    tensors, _ = read_native(path)
    check_tensors(tensors, path)


def check_tensors(tensors: dict[str, torch.Tensor], where: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a module must be floating point and finite: a module that diverged (NaN, Inf) or was
    stored as integers would otherwise be fused, scored or trained from, and give numbers that mean nothing."""
    for name, t in tensors.items():
        if not torch.is_floating_point(t):
            raise UserInputError(f"{where}: tensor {name} is of dtype {t.dtype}; a delta module's tensors must be "
                                 "floating point")
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise UserInputError(f"{where}: tensor {name} holds {bad} NaN or infinite value(s) of {t.numel()}; the "
                                 "module diverged or is corrupt, so it is not used")
    return tensors



# safetensors' names of the floating-point dtypes
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
