"""Delta modules on a frozen backbone, and their checkpoints.

Every module is added under the single name ``DELTA_NAME`` so that parameter names are identical
across tasks and runs: a checkpoint trained on one task loads into a model prepared for another.
What differs between methods (library config, sizes, groups, neutral state, task vector) lives in
``models/methods/``, one file per method; this module only asks that registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from models.backbone import backbone_name
from models.backbones import family_of
from models.methods import (
    DELTA_NAME,
    GRANULARITIES,
    METHODS,
    REGISTRY,
    SIZE_FLAGS,
    DeltaMethod,
    add_size_flags,
    get_method,
    param_group,
)
from models.methods.adapter import ADAPTER_TYPES
from models.sizes import METHOD_SIZES
from utils.errors import UserInputError
from utils.io import fsync_dir, fsync_file, with_umask_mode

__all__ = ["ADAPTER_TYPES", "CONFIG_FILE", "DELTA_NAME", "GRANULARITIES", "METHODS", "SIZE_FLAGS", "WEIGHTS_FILE",
    "DeltaConfig", "add_size_flags", "attach_delta", "backbone_fingerprint", "check_compatible",
    "check_delta_shapes", "count_params", "delta_params", "delta_state_dict", "describe", "is_delta_param",
    "library_config", "load_delta_state", "param_group", "save_delta_checkpoint"]

PAPER_SIZES = METHOD_SIZES["paper"]
FORMAT_VERSION = 1
WEIGHTS_FILE = "delta.safetensors"
CONFIG_FILE = "delta_config.json"
REQUIRED_META_KEYS = (
    "format_version",
    "method",
    "sizes",
    "backbone",
    "backbone_fingerprint",
    "task",
    "metric",
    "score",
    "step",
)

# Sub-module names under which `adapters` stores the weights of the named module, over every method.
_DELTA_NAME_RE = re.compile(
    rf"\.(?:{'|'.join(sorted({re.escape(m.storage) for m in REGISTRY.values()}))})\.{DELTA_NAME}\.")


class DeltaConfig:
    """Which delta module to attach and its sizes: ``DeltaConfig("lora", lora_r=4, lora_alpha=8)``.

    A size left out takes the paper's value (models/sizes.py), as tune.py's flags do. Sizes read as
    attributes (``cfg.lora_r``); ``sizes()`` gives exactly the method's fields, which two compatible
    checkpoints share.
    """

    def __init__(self, method: str, **sizes: Any) -> None:
        self.method = method
        self.values: dict[str, Any] = {**PAPER_SIZES.get(method, {}), **sizes}

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__} of method {self.__dict__.get('method')!r} has no {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DeltaConfig) or self.method != other.method:
            return False
        own = [f.name for f in REGISTRY[self.method].size_fields] if self.method in REGISTRY else list(self.values)
        return all(self.values.get(k) == other.values.get(k) for k in own)

    __hash__ = None  # mutable, like a dataclass

    def __repr__(self) -> str:
        return f"DeltaConfig({self.method!r}, {', '.join(f'{k}={v!r}' for k, v in self.values.items())})"

    @property
    def spec(self) -> DeltaMethod:
        """The registered method (models/methods/)."""
        return get_method(self.method)

    @classmethod
    def from_flags(cls, method: str, flags: dict[str, Any]) -> DeltaConfig:
        """The config of ``method`` with its sizes taken from ``flags`` (e.g. ``vars(args)``); others ignored."""
        spec = get_method(method, "--tune_method")
        return cls(method, **{f.name: flags[f.name] for f in spec.size_fields if f.name in flags}).validate()

    def validate(self) -> DeltaConfig:
        """Raise UserInputError for an unknown method, an unknown size or a bad value; return self."""
        spec = self.spec
        # Any method's size is accepted (a command line carries them all); only this method's are used.
        unknown = sorted(set(self.values) - set(SIZE_FLAGS))
        if unknown:
            raise UserInputError(f"delta config: unknown keys {unknown}; expected some of {sorted(SIZE_FLAGS)}")
        for field in spec.size_fields:
            if field.name not in self.values:
                raise UserInputError(f"delta config: method {self.method} needs --{field.name}")
            self.values[field.name] = field.normalise(self.values[field.name])
        return self

    def sizes(self) -> dict[str, Any]:
        """The fields that shape this method's module; two checkpoints are compatible iff these match. A field at
        its ``earlier`` value (models/methods/base.py) is left out, as modules made before it existed record it."""
        return {f.name: self.values[f.name] for f in self.validate().spec.size_fields
                if f.earlier is None or self.values[f.name] != f.earlier}

    def describe(self) -> str:
        """One-line summary for messages, e.g. ``method=lora lora_r=10 lora_alpha=16``."""
        return describe(self.method, self.sizes())

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.sizes()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaConfig:
        """Build and validate; unknown keys are refused so that typos do not pass silently."""
        if "method" not in data:
            raise UserInputError("delta config: missing key 'method'")
        return cls(data["method"], **{k: v for k, v in data.items() if k != "method"}).validate()

    @classmethod
    def from_checkpoint_meta(cls, meta: dict[str, Any]) -> DeltaConfig:
        """The config a checkpoint was trained with (method plus its sizes)."""
        sizes = meta.get("sizes")
        if not isinstance(sizes, dict):
            raise UserInputError(f"delta checkpoint meta: expected 'sizes' to be an object, found {sizes!r}")
        return cls.from_dict({"method": meta.get("method"), **sizes})


def describe(method: Any, sizes: Any) -> str:
    """``method=lora lora_r=10 lora_alpha=16`` (or the raw sizes when they are not a mapping)."""
    if isinstance(sizes, dict):
        return " ".join([f"method={method}"] + [f"{k}={v}" for k, v in sizes.items()])
    return f"method={method} sizes={sizes!r}"


# --------------------------------------------------------------------------------------------------
# Attaching the module


def backbone_fingerprint(model: nn.Module) -> dict[str, int | str]:
    """What a delta checkpoint depends on: the architecture's numbers and a hash of the weights' content.

    The hash tells apart backbones of one shape (t5-v1_1-base, t5-base-lm-adapt and flan-t5-base modules
    would otherwise pass for one another). It is taken over each frozen tensor's name, shape and 64 values
    at evenly spaced positions, rounded to bfloat16, so it costs microseconds and a bf16 copy of the same
    weights hashes the same.
    """
    return {**family_of(model).fingerprint(model.config), "weights": weights_hash(model)}


def weights_hash(model: nn.Module, samples: int = 64) -> str:
    """``sha256:`` + 16 hex digits of a sample of the backbone's own (non-delta) parameters."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if is_delta_param(name):
            continue
        flat = param.detach().reshape(-1)
        positions = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel()), device=flat.device).long()
        values = flat[positions].to(torch.bfloat16).float().cpu().numpy()
        digest.update(f"{name}:{tuple(param.shape)}:".encode())
        digest.update(values.tobytes())
    return "sha256:" + digest.hexdigest()[:16]


def library_config(cfg: DeltaConfig, d_model: int) -> Any:
    """The AdapterHub configuration of ``cfg`` (its method's, from its sizes)."""
    return cfg.spec.library_config(cfg.sizes(), d_model)


def is_delta_param(name: str) -> bool:
    """True for parameters that belong to the delta module (by name, so frozen deltas count too)."""
    return _DELTA_NAME_RE.search(name) is not None


def attach_delta(model: nn.Module, cfg: DeltaConfig) -> list[str]:
    """Add the delta module to a backbone of any family, freeze all else, activate it.

    Returns the sorted names of the trainable parameters (exactly the delta parameters). The model's
    train/eval mode is left as it was: the library's ``train_adapter`` switches to train mode, which
    would silently turn on the backbone's dropout for evaluation.
    """
    import adapters

    cfg.validate()
    if getattr(model, "adapters_config", None) is not None and DELTA_NAME in model.adapters_config:
        raise ValueError(f"model already has a delta module named {DELTA_NAME!r}")
    family = family_of(model)
    if not family.supports(cfg.method):
        raise UserInputError(f"delta method {cfg.method!r} is not built by AdapterHub on {family.name} backbones "
                             f"({model.config.model_type}); supported there: "
                             f"{', '.join(m for m in METHODS if family.supports(m))}")
    was_training = model.training
    family.prepare_for(model, cfg.method)
    adapters.init(model)
    # set_active_adapters() first resets LoRA inside a forward context with nothing active yet, which logs
    # a spurious "none are activated" warning; silence just that logger while we set up.
    mixin_logger = logging.getLogger("adapters.model_mixin")
    level = mixin_logger.level
    mixin_logger.setLevel(logging.ERROR)
    try:
        model.add_adapter(DELTA_NAME, config=library_config(cfg, family.width(model.config)))
        model.train_adapter(DELTA_NAME)  # freezes every other parameter and activates the module
    finally:
        mixin_logger.setLevel(level)
    model.train(was_training)

    cfg.spec.check_built(model, cfg.sizes())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    delta = sorted(n for n, _ in model.named_parameters() if is_delta_param(n))
    if not trainable or trainable != delta:
        extra, frozen = sorted(set(trainable) - set(delta)), sorted(set(delta) - set(trainable))
        raise RuntimeError(
            f"expected exactly the delta parameters to be trainable; also trainable: {extra[:3]}, "
            f"frozen delta: {frozen[:3]}"
        )
    return trainable


def delta_params(model: nn.Module) -> dict[str, nn.Parameter]:
    # named_parameters() de-duplicates shared modules, so the prefix pool (reachable from every attention
    # layer) appears once, under its first path.
    return {n: p for n, p in model.named_parameters() if is_delta_param(n)}


def delta_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The delta parameters as detached, contiguous CPU copies, keyed by parameter name."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in sorted(delta_params(model).items())}


def check_delta_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse ``shapes`` (parameter name -> shape) unless they match the model's delta parameters exactly."""
    params = delta_params(model)
    missing = sorted(set(params) - set(shapes))
    unexpected = sorted(set(shapes) - set(params))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise UserInputError(f"{source}: delta weights do not fit this model: {'; '.join(parts)}")
    bad = [
        f"{n}: checkpoint {tuple(shapes[n])} vs model {tuple(p.shape)}"
        for n, p in sorted(params.items())
        if tuple(shapes[n]) != tuple(p.shape)
    ]
    if bad:
        examples = "; ".join(bad[:3])
        raise UserInputError(f"{source}: {len(bad)} delta weights have the wrong shape, e.g. {examples}")


def load_delta_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into the model's delta parameters; keys and shapes must match exactly."""
    check_delta_shapes(model, {n: tuple(t.shape) for n, t in tensors.items()}, source)
    params = delta_params(model)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])


# --------------------------------------------------------------------------------------------------
# Checkpoints


def save_delta_checkpoint(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    cfg: DeltaConfig,
    backbone: str,
    fingerprint: dict[str, int],
    *,
    task: str | None = None,
    metric: str | None = None,
    score: float | None = None,
    step: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``delta.safetensors`` + ``delta_config.json`` into folder ``path``, atomically.

    The folder is built as a hidden temporary sibling and renamed into place, so a crash leaves either
    the old checkpoint or the new one, never a half-written folder. An existing folder is only replaced
    if it is a delta checkpoint (or empty), so a mistyped path cannot wipe unrelated files.
    """
    path = Path(os.path.abspath(path))  # so "." or "ckpt/" still has a parent and a name for the siblings
    cfg.validate()
    if path.exists():
        if not path.is_dir():
            raise UserInputError(f"{path}: expected a checkpoint folder, found a file")
        if any(path.iterdir()) and not (path / CONFIG_FILE).is_file():
            raise UserInputError(
                f"{path}: exists and is not a delta checkpoint (no {CONFIG_FILE}); not replacing it"
            )
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "method": cfg.method,
        "sizes": cfg.sizes(),
        "backbone": backbone,
        "backbone_fingerprint": dict(fingerprint),
        "task": task,
        "metric": metric,
        "score": None if score is None else float(score),
        "step": None if step is None else int(step),
    }
    if extra is not None:
        meta["extra"] = extra
    text = json.dumps(meta, indent=2) + "\n"  # fail before touching the disk if not JSON-able

    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp = parent / f".{path.name}.tmp-{token}"
    old = parent / f".{path.name}.old-{token}"
    tmp.mkdir()
    moved_old = False
    try:
        # Own copies: safetensors refuses tensors that share storage (e.g. views of one buffer).
        owned = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
        save_file(owned, str(tmp / WEIGHTS_FILE))
        with_umask_mode(tmp / WEIGHTS_FILE)  # safetensors writes 0600 whatever the umask
        (tmp / CONFIG_FILE).write_text(text, encoding="utf-8")
        fsync_file(tmp / WEIGHTS_FILE)
        fsync_file(tmp / CONFIG_FILE)
        fsync_dir(tmp)
        if path.exists():
            os.rename(path, old)
            moved_old = True
        os.rename(tmp, path)
        fsync_dir(parent)
    except BaseException:
        if moved_old and not path.exists():
            os.rename(old, path)
            moved_old = False
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if moved_old:
            shutil.rmtree(old, ignore_errors=True)
    return path


def check_compatible(
    meta: dict[str, Any], cfg: DeltaConfig, fingerprint: dict[str, int | str], source: str,
    *, allow_other_weights: bool = False, backbone: str | None = None,
) -> None:
    """Refuse a checkpoint whose method, sizes or backbone differ from this run's.

    A backbone of the same shape with other weights is refused too, unless ``allow_other_weights``
    (the ``--allow_other_backbone`` flag): using a module on another backbone on purpose is an experiment,
    doing it by accident gives numbers that look fine and mean nothing.
    """
    made = describe(meta.get("method"), meta.get("sizes"))
    if meta.get("method") != cfg.method or meta.get("sizes") != cfg.sizes():
        raise UserInputError(f"checkpoint {source} was made with {made}; this run uses {cfg.describe()}")
    theirs = meta.get("backbone_fingerprint")
    if not isinstance(theirs, dict) or not theirs:
        theirs = {}
    # A module converted from another format, or written before the weights hash existed, records only
    # part of the fingerprint: compare the entries it records.
    shape = {k: v for k, v in theirs.items() if k != "weights"}
    if shape != {k: fingerprint.get(k) for k in shape} or not theirs:
        raise UserInputError(
            f"checkpoint {source} was made for backbone {meta.get('backbone')!r} with {_fmt(theirs)}; "
            f"this run's backbone has {_fmt(fingerprint)}"
        )
    if "weights" in theirs and theirs["weights"] != fingerprint.get("weights") and not allow_other_weights:
        mine = f"{backbone!r} " if backbone else ""
        raise UserInputError(
            f"checkpoint {source} was made for backbone {meta.get('backbone')!r} (weights {theirs['weights']}); "
            f"this run's backbone {mine}has the same shape but other weights ({fingerprint.get('weights')}); "
            "pass --allow_other_backbone to use it on purpose"
        )
    extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
    if extra.get("source_format") == "peft" and backbone is not None and not allow_other_weights:
        # A PEFT adapter records its base model by name only (no weights hash): the names must agree, as
        # backbone_name shortens them (google/flan-t5-large and /data/models/flan-t5-large are one model).
        base = str(meta.get("backbone") or "unknown")
        if base == "unknown" or backbone_name(base).lower() != backbone_name(backbone).lower():
            raise UserInputError(
                f"checkpoint {source} is a PEFT adapter of base model {base!r}; this run's backbone is "
                f"{backbone!r}; pass --allow_other_backbone to use it on purpose"
            )


def _fmt(d: Any) -> str:
    if isinstance(d, dict):
        return " ".join(f"{k}={v}" for k, v in d.items())
    return repr(d)


def count_params(tensors: dict[str, torch.Tensor]) -> int:
    """Total number of scalars in a state dict (for logs and reports)."""
    return sum(math.prod(t.shape) for t in tensors.values())
