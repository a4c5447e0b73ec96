"""PEFT LoRA adapters (``adapter_config.json`` with a ``peft_type``, ``adapter_model.safetensors`` or the older
``adapter_model.bin``): read as this project's LoRA modules, and written from them.

What maps: a LoRA of the projections AdapterHub's LoRA reaches, one rank and alpha for every layer. For T5 that is
``q``, ``k``, ``v`` (like PEFT's, they reach self-attention and the decoder's cross-attention), ``wo``, and ``wi`` or
``wi_1``; for Llama-family models ``q_proj``, ``k_proj``, ``v_proj``, ``up_proj`` and ``down_proj`` (the table is each
backbone family's ``lora_modules``). An attention output projection (``o``, ``o_proj``), ``wi_0`` or ``gate_proj``
is refused. The set becomes the module's ``lora_targets``. PEFT stores
``base_model.model.{module}.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r], as this project stores
``{module}.loras.delta.lora_A`` and ``.lora_B``; the scaling is alpha/r, or alpha/√r with ``use_rslora``, which
is folded into B on import (the module's own alpha/r stays). Anything else (other target modules, DoRA, per-layer
ranks, biases, extra trained modules) is refused in one line naming the setting. The weights are read through
safetensors or the restricted ``torch.load``, so an ``adapter_model.bin`` cannot run code.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from models.backbones import family_of_names, lora_location
from models.delta import DELTA_NAME, FORMAT_VERSION, DeltaConfig
from models.legacy import read_foreign_weights
from models.methods import REGISTRY
from models.methods.lora import projection_of, targets_of
from utils.errors import UserInputError
from utils.io import read_json_object

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
# Settings that change what the adapter computes and that this project's LoRA cannot express: refused when set.
UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "layers_to_transform": "LoRA on some layers only",
    "layers_pattern": "LoRA on some layers only",
    "modules_to_save": "extra fully trained modules",
    "lora_bias": "a trained bias on lora_B",
    "target_parameters": "LoRA on parameters rather than modules",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trained token embeddings",
    "use_qalora": "QA-LoRA",
    "exclude_modules": "excluded modules",
}
_PEFT_KEY_RE = re.compile(rf"^{re.escape(PEFT_PREFIX)}(.+)\.(lora_[AB])\.weight$")
_OUR_KEY_RE = re.compile(rf"^(.+)\.loras\.{re.escape(DELTA_NAME)}\.(lora_[AB])$")


def peft_config(path: Path) -> dict[str, Any] | None:
    """The folder's adapter_config.json when it is a PEFT one (has ``peft_type``), else None."""
    cfg_file = path / PEFT_CONFIG
    if not cfg_file.is_file():
        return None
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None  # not JSON: left to the AdapterHub reader, whose error names the file and the line
    return data if isinstance(data, dict) and "peft_type" in data else None


def is_peft_folder(path: Path) -> bool:
    return path.is_dir() and peft_config(path) is not None


def _check_config(data: dict[str, Any], cfg_file: Path) -> tuple[int, float, bool]:
    """(r, lora_alpha, use_rslora) of a PEFT LoRA config this project can express; else one line."""
    kind = data.get("peft_type")
    if kind != "LORA":
        raise UserInputError(f"{cfg_file}: peft_type {kind!r}; only PEFT LoRA adapters (peft_type 'LORA') can be "
                             "imported (PEFT's IA³ scales other activations than this project's (IA)³)")
    for key, what in UNSUPPORTED.items():
        if data.get(key) not in (None, False, [], {}, ""):
            raise UserInputError(f"{cfg_file}: {key}={data[key]!r} ({what}) cannot be expressed by this project's "
                                 "LoRA")
    if data.get("bias", "none") != "none":
        raise UserInputError(f"{cfg_file}: bias={data['bias']!r} (trained biases) cannot be expressed by this "
                             "project's LoRA; expected 'none'")
    r, alpha = data.get("r"), data.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise UserInputError(f"{cfg_file}: expected a positive integer 'r', found {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise UserInputError(f"{cfg_file}: expected a positive 'lora_alpha', found {alpha!r}")
    for key, default in (("rank_pattern", r), ("alpha_pattern", alpha)):
        pattern = data.get(key) or {}
        if not isinstance(pattern, dict) or any(v != default for v in pattern.values()):
            raise UserInputError(f"{cfg_file}: {key}={pattern!r} (per-layer ranks or alphas) cannot be expressed "
                                 "by this project's LoRA, which has one rank and alpha for every layer")
    targets = data.get("target_modules")
    if isinstance(targets, str) or not isinstance(targets, list) or not targets or \
            not all(isinstance(t, str) for t in targets):
        raise UserInputError(f"{cfg_file}: target_modules={targets!r}; expected a list of projection names (a "
                             "pattern or 'all-linear' cannot be checked against what this project's LoRA reaches)")
    for target in targets:
        lora_location(target, f"{cfg_file}: target_modules={targets!r}")
    return r, alpha, bool(data.get("use_rslora"))


def read_peft_folder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A PEFT LoRA folder as this project's (tensors, meta)."""
    path = Path(path)
    cfg_file = path / PEFT_CONFIG
    data = read_json_object(cfg_file)
    r, alpha, rslora = _check_config(data, cfg_file)
    declared = set(data["target_modules"])
    weights = next((path / f for f in PEFT_WEIGHTS if (path / f).is_file()), None)
    if weights is None:
        raise UserInputError(f"{path}: PEFT adapter without weights (expected {' or '.join(PEFT_WEIGHTS)})")
    raw = read_foreign_weights(weights)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        match = _PEFT_KEY_RE.match(str(key))
        if not match or match.group(1).rsplit(".", 1)[-1] not in declared:
            raise UserInputError(f"{weights}: tensor {key!r} is not the lora_A or lora_B weight of a projection "
                                 f"its config targets ({', '.join(sorted(declared))})")
        module, factor = match.groups()
        tensors[f"{module}.loras.{DELTA_NAME}.{factor}"] = value.contiguous()
    pairs = REGISTRY["lora"].factor_pairs(tensors)
    for ka, kb in pairs.values():
        if tensors[ka].shape[0] != r or tensors[kb].shape[1] != r:
            raise UserInputError(f"{weights}: {ka} has rank {tensors[ka].shape[0]}, but the config says r={r}")
        if rslora:  # PEFT scales by alpha/√r; this project's module by alpha/r: the factor √r goes into B
            tensors[kb] = tensors[kb] * math.sqrt(r)
    cfg = DeltaConfig("lora", lora_r=r, lora_alpha=alpha, lora_targets=targets_of(tensors, str(weights))).validate()
    d_model = next(iter(tensors[ka] for ka, _ in pairs.values())).shape[1]
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    base = data.get("base_model_name_or_path")
    meta = {
        "format_version": FORMAT_VERSION,
        "method": cfg.method,
        "sizes": cfg.sizes(),
        "backbone": str(base) if base else "unknown",
        "backbone_fingerprint": {"d_model": d_model, **REGISTRY["lora"].layer_counts(shapes, d_model)},
        "task": None, "metric": None, "score": None, "step": None,
        "extra": {"converted_from": str(path), "source_format": "peft", "peft_version": data.get("peft_version"),
                  "use_rslora": rslora},
    }
    return tensors, meta


def peft_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This project's LoRA tensor names -> PEFT's (the inverse of the import's renaming)."""
    out = {}
    for key, value in tensors.items():
        match = _OUR_KEY_RE.match(key)
        if not match:
            raise UserInputError(f"tensor {key!r} is not a LoRA factor of this project's format")
        module, factor = match.groups()
        out[f"{PEFT_PREFIX}{module}.{factor}.weight"] = value.contiguous()
    return out


def peft_config_for(cfg: DeltaConfig, base_model: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The adapter_config.json of this project's LoRA (tensors under this project's names) as PEFT reads it."""
    modules = sorted({projection_of(key) for key in tensors})
    task_type = "CAUSAL_LM" if family_of_names(tensors).name == "causal" else "SEQ_2_SEQ_LM"
    return {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
            "r": cfg.values["lora_r"], "lora_alpha": cfg.values["lora_alpha"], "target_modules": modules,
            "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
            "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "init_lora_weights": True,
            "inference_mode": True}
