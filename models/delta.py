"""Delta modules (bottleneck adapter, LoRA, prefix tuning) on a frozen T5, and their checkpoints.

Every module is added under the single name ``DELTA_NAME`` so that parameter names are identical
across tasks and runs: a checkpoint trained on one task loads into a model prepared for another.

Library choices (``adapters`` 1.3.0), see ``library_config``:

* adapter: ``DoubleSeqBnConfig`` (Houlsby: after self-attention and after the FFN of every block) or
  ``SeqBnConfig`` (Pfeiffer: after the FFN only), ``init_weights="mam_adapter"`` (up-projection zero, so
  the module starts as the identity). The library sizes the bottleneck as
  ``int(d_model // reduction_factor)``; ``d_model / size`` in floating point does not always round back
  to ``size`` (5 // (5 / 3) == 2.0), so we pass ``d_model / (size + 0.5)``, whose floor is ``size``
  with half a unit of margin, and check the built widths.
* LoRA: ``LoRAConfig(r, alpha)`` on the ``q`` and ``v`` projections. For T5 the library's
  ``selfattn_lora`` location covers both self-attention and the decoder's cross-attention
  (``EncDecAttention``); we keep that library behaviour rather than patching modules out.
  ``lora_B`` starts at zero, so the module starts neutral.
* prefix: ``PrefixTuningConfig(prefix_length, bottleneck_size=prefix_mlp, flat=False)`` with prefixes
  for encoder self-attention, decoder self-attention and decoder cross-attention. Each prefix is an
  embedding of ``prefix_length`` rows fed through a two-layer MLP (width ``prefix_mlp``) that emits the
  keys and values of all layers at once; the MLP weights are ordinary trainable parameters (they are
  what we save). The prefix is not neutral at start.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from models.sizes import METHOD_SIZES
from utils.errors import UserInputError
from utils.io import fsync_dir, fsync_file

METHODS = ("adapter", "lora", "prefix")
PAPER_SIZES = METHOD_SIZES["paper"]
ADAPTER_TYPES = ("houlsby", "pfeiffer")
GRANULARITIES = ("model", "block", "layer")
DELTA_NAME = "delta"
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

# Sub-module names under which `adapters` stores the weights of a named module, per method.
_DELTA_NAME_RE = re.compile(rf"\.(?:adapters|loras|prefix_tunings)\.{DELTA_NAME}\.")
_PREFIX_RE = re.compile(rf"\.prefix_tunings\.{DELTA_NAME}\.(\w+?)\.")
_BLOCK_RE = re.compile(r"(?:^|\.)(encoder|decoder)\.block\.(\d+)\.")
# Which stack each prefix of the shared pool feeds, and its layer-granularity group (see `param_group`).
_PREFIX_GROUPS = {
    "encoder_prefix": ("encoder", "encoder.prefix"),
    "self_prefix": ("decoder", "decoder.self_prefix"),
    "cross_prefix": ("decoder", "decoder.cross_prefix"),
}


@dataclass
class DeltaConfig:
    """Which delta module to attach and its sizes (one field set per method)."""

    method: str
    # The defaults are the paper's sizes (models/sizes.py), as tune.py's flags are.
    adapter_type: str = str(PAPER_SIZES["adapter"]["adapter_type"])
    adapter_size: int = int(PAPER_SIZES["adapter"]["adapter_size"])
    lora_r: int = int(PAPER_SIZES["lora"]["lora_r"])
    lora_alpha: int = int(PAPER_SIZES["lora"]["lora_alpha"])
    prefix_length: int = int(PAPER_SIZES["prefix"]["prefix_length"])
    prefix_mlp: int = int(PAPER_SIZES["prefix"]["prefix_mlp"])

    def validate(self) -> DeltaConfig:
        """Raise UserInputError for an unknown method/adapter type or a non-positive size; return self."""
        if self.method not in METHODS:
            raise UserInputError(f"--method: expected one of {', '.join(METHODS)}, found {self.method!r}")
        if self.adapter_type not in ADAPTER_TYPES:
            raise UserInputError(
                f"--adapter_type: expected one of {', '.join(ADAPTER_TYPES)}, found {self.adapter_type!r}"
            )
        for name in ("adapter_size", "lora_r", "lora_alpha", "prefix_length", "prefix_mlp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserInputError(f"--{name}: expected a positive integer, found {value!r}")
        return self

    def sizes(self) -> dict[str, Any]:
        """The fields that shape this method's module; two checkpoints are compatible iff these match."""
        if self.method == "adapter":
            return {"adapter_type": self.adapter_type, "adapter_size": self.adapter_size}
        if self.method == "lora":
            return {"lora_r": self.lora_r, "lora_alpha": self.lora_alpha}
        if self.method == "prefix":
            return {"prefix_length": self.prefix_length, "prefix_mlp": self.prefix_mlp}
        raise UserInputError(f"--method: expected one of {', '.join(METHODS)}, found {self.method!r}")

    def describe(self) -> str:
        """One-line summary for messages, e.g. ``method=lora lora_r=10 lora_alpha=16``."""
        return _describe(self.method, self.sizes())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaConfig:
        """Build and validate; unknown keys are refused so that typos do not pass silently."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserInputError(f"delta config: unknown keys {unknown}; expected some of {sorted(known)}")
        if "method" not in data:
            raise UserInputError("delta config: missing key 'method'")
        return cls(**data).validate()

    @classmethod
    def from_checkpoint_meta(cls, meta: dict[str, Any]) -> DeltaConfig:
        """The config a checkpoint was trained with (method plus its sizes)."""
        sizes = meta.get("sizes")
        if not isinstance(sizes, dict):
            raise UserInputError(f"delta checkpoint meta: expected 'sizes' to be an object, found {sizes!r}")
        return cls.from_dict({"method": meta.get("method"), **sizes})


def _describe(method: Any, sizes: Any) -> str:
    if isinstance(sizes, dict):
        return " ".join([f"method={method}"] + [f"{k}={v}" for k, v in sizes.items()])
    return f"method={method} sizes={sizes!r}"


# --------------------------------------------------------------------------------------------------
# Attaching the module


def backbone_fingerprint(model: nn.Module) -> dict[str, int]:
    """Architecture numbers that a delta checkpoint depends on (catches a renamed, different backbone)."""
    c = model.config
    return {
        "d_model": int(c.d_model),
        "num_layers": int(c.num_layers),
        "num_decoder_layers": int(c.num_decoder_layers),
        "vocab_size": int(c.vocab_size),
    }


def _adapter_reduction_factor(d_model: int, size: int) -> float:
    """Reduction factor for which the library's ``int(d_model // rf)`` is exactly ``size``."""
    rf = d_model / (size + 0.5)
    if int(d_model // rf) != size:  # cannot happen for realistic sizes; guards the reasoning above
        raise ValueError(f"no reduction factor gives bottleneck {size} for d_model={d_model}")
    return rf


def library_config(cfg: DeltaConfig, d_model: int) -> Any:
    from adapters import DoubleSeqBnConfig, LoRAConfig, PrefixTuningConfig, SeqBnConfig

    if cfg.method == "adapter":
        cls = DoubleSeqBnConfig if cfg.adapter_type == "houlsby" else SeqBnConfig
        return cls(
            reduction_factor=_adapter_reduction_factor(d_model, cfg.adapter_size), init_weights="mam_adapter"
        )
    if cfg.method == "lora":
        return LoRAConfig(
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            selfattn_lora=True,
            intermediate_lora=False,
            output_lora=False,
            attn_matrices=["q", "v"],
        )
    return PrefixTuningConfig(
        prefix_length=cfg.prefix_length,
        bottleneck_size=cfg.prefix_mlp,
        flat=False,
        encoder_prefix=True,
        cross_prefix=True,
    )


def is_delta_param(name: str) -> bool:
    """True for parameters that belong to the delta module (by name, so frozen deltas count too)."""
    return _DELTA_NAME_RE.search(name) is not None


def attach_delta(model: nn.Module, cfg: DeltaConfig) -> list[str]:
    """Add the delta module to a T5ForConditionalGeneration, freeze all else, activate it.

    Returns the sorted names of the trainable parameters (exactly the delta parameters). The model's
    train/eval mode is left as it was: the library's ``train_adapter`` switches to train mode, which
    would silently turn on T5's dropout for evaluation.
    """
    import adapters

    cfg.validate()
    if getattr(model, "adapters_config", None) is not None and DELTA_NAME in model.adapters_config:
        raise ValueError(f"model already has a delta module named {DELTA_NAME!r}")
    was_training = model.training
    adapters.init(model)
    # set_active_adapters() first resets LoRA inside a forward context with nothing active yet, which logs
    # a spurious "none are activated" warning; silence just that logger while we set up.
    mixin_logger = logging.getLogger("adapters.model_mixin")
    level = mixin_logger.level
    mixin_logger.setLevel(logging.ERROR)
    try:
        model.add_adapter(DELTA_NAME, config=library_config(cfg, int(model.config.d_model)))
        model.train_adapter(DELTA_NAME)  # freezes every other parameter and activates the module
    finally:
        mixin_logger.setLevel(level)
    model.train(was_training)

    if cfg.method == "adapter":
        suffix = f".{DELTA_NAME}.adapter_down.0"
        widths = {m.out_features for n, m in model.named_modules() if n.endswith(suffix)}
        if widths != {cfg.adapter_size}:
            raise RuntimeError(f"adapter widths {sorted(widths)} != --adapter_size {cfg.adapter_size}")
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
# Parameter groups


def param_group(name: str, granularity: str) -> str:
    """Group of a delta parameter at ``model``, ``block`` (encoder/decoder) or ``layer`` granularity.

    Bottleneck and LoRA weights live inside ``{encoder,decoder}.block.<i>`` and group per layer as
    ``encoder.3`` / ``decoder.0``. Prefix-tuning weights live in one pool shared by all layers (their
    name is the first path that reaches it, ``encoder.block.0...prefix_tunings.delta.<kind>...``, which
    says nothing about the layer). Each prefix's MLP emits the keys/values of all layers of one stack at
    once, so it cannot be split per layer: its block is the stack it feeds (``encoder_prefix`` ->
    encoder; ``self_prefix``/``cross_prefix`` -> decoder) and its layer group is the prefix itself
    (``encoder.prefix``, ``decoder.self_prefix``, ``decoder.cross_prefix``).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: expected one of {', '.join(GRANULARITIES)}, found {granularity!r}")
    if granularity == "model":
        return "model"
    prefix = _PREFIX_RE.search(name)
    if prefix is not None:
        if prefix.group(1) not in _PREFIX_GROUPS:
            raise ValueError(f"unknown prefix kind {prefix.group(1)!r} in parameter {name!r}")
        block, layer = _PREFIX_GROUPS[prefix.group(1)]
        return block if granularity == "block" else layer
    m = _BLOCK_RE.search(name)
    if m is None:
        raise ValueError(f"parameter {name!r} is not inside an encoder/decoder block")
    return m.group(1) if granularity == "block" else f"{m.group(1)}.{int(m.group(2))}"


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
    meta: dict[str, Any], cfg: DeltaConfig, fingerprint: dict[str, int], source: str
) -> None:
    """Refuse a checkpoint whose method, sizes or backbone differ from this run's."""
    made = _describe(meta.get("method"), meta.get("sizes"))
    if meta.get("method") != cfg.method or meta.get("sizes") != cfg.sizes():
        raise UserInputError(f"checkpoint {source} was made with {made}; this run uses {cfg.describe()}")
    theirs = meta.get("backbone_fingerprint")
    # A module converted from another format may record only part of it (an AdapterHub folder has no
    # vocabulary size): compare the numbers it records.
    mine = {k: fingerprint.get(k) for k in theirs} if isinstance(theirs, dict) and theirs else fingerprint
    if theirs != mine:
        raise UserInputError(
            f"checkpoint {source} was made for backbone {meta.get('backbone')!r} with {_fmt(theirs)}; "
            f"this run's backbone has {_fmt(fingerprint)}"
        )


def _fmt(d: Any) -> str:
    if isinstance(d, dict):
        return " ".join(f"{k}={v}" for k, v in d.items())
    return repr(d)


def count_params(tensors: dict[str, torch.Tensor]) -> int:
    """Total number of scalars in a state dict (for logs and reports)."""
    return sum(math.prod(t.shape) for t in tensors.values())
