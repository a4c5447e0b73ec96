"""Delta modules saved elsewhere: the original research code's ``.pt`` files and AdapterHub ``save_adapter`` folders.

Both are untrusted input. Weights are read only through safetensors or ``torch.load(weights_only=True)``
(``safe_torch_load``, the project's one call of ``torch.load``): a pickle that asks for any other callable
than tensors, plain containers and ``argparse.Namespace`` is refused before anything in it runs.

**The original ``.pt`` format** (``torch.save`` in its trainer): ``{'adapter'|'lora'|'prefix': state dict,
'args': Namespace or vars(Namespace), 'current_state': {'epoch', 'num_updates'}}``, sometimes with a pickled
model ``config`` object, which safe loading refuses (the message says how to re-save the tensors). Its
modules were hand-written inside a copy of T5 (``module/adapter.py``, ``module/lora.py``,
``module/prefix.py``):

* LoRA: ``{stack}.block.{i}.layer.{j}.{SelfAttention|EncDecAttention}.{q|v}.lora_A`` of shape (in, r) and
  ``lora_B`` (r, out), adding ``x @ A @ B * alpha / r``; loralib's own layout, (r, in) and (out, r), is told
  apart by shape. AdapterHub's LoRA on q and v of every attention computes the same with A and B transposed,
  so these convert exactly. ``alpha`` is not in the tensors: it comes from ``--lora_alpha`` or the saved args.
* Bottleneck adapter: ``{stack}.block.{i}.layer.{j}.adapter.adapter_A`` (d_model, size) and ``adapter_B``
  (size, d_model), no biases, adding ``x + B(act(A x))`` to the sub-layer output ``x``. Houlsby put one after
  every sub-layer, *decoder cross-attention included*; AdapterHub's Houlsby adapter (``DoubleSeqBnConfig``)
  has none there, so those are refused unless ``drop_cross_adapters`` (then the module differs from the
  original). The other positions convert exactly (zero biases). Pfeiffer is refused: AdapterHub's
  ``SeqBnConfig`` on T5 feeds the adapter the FFN output *plus the residual stream*, the original fed the FFN
  output alone, so the same weights would compute something else.
* Prefix: ``{stack}.prefix.prefix`` with ``prefix_project``. Refused: the original reshapes one projection
  into keys and values by a raw ``view`` (mixing prefix positions), gives prefix positions T5's relative
  position bias and has no cross-attention prefix, none of which AdapterHub's prefix tuning can express.

Tensors already named as in this project or in AdapterHub (``...adapters.<name>...``, ``...loras.<name>...``,
``...prefix_tunings.<name>...``) convert under any module name. Other namings can be mapped first with
regex -> replacement rules (``key_map``).

**AdapterHub folders** (``model.save_adapter(dir, name)``, ``adapter_config.json`` plus ``adapter.safetensors``
or ``pytorch_adapter.bin``) load directly: ``models.formats.load_delta_checkpoint`` reads them with
``read_adapterhub_folder``, which renames the module to ``delta`` and accepts the folder only if its
configuration is one this project builds (``models.delta.library_config``). Their backbone fingerprint lacks
the vocabulary size, which the folder does not record.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from models.delta import (
    CONFIG_FILE,
    DELTA_NAME,
    FORMAT_VERSION,
    METHODS,
    REGISTRY,
    DeltaConfig,
    library_config,
)
from models.methods import method_of
from utils.errors import UserInputError, first_line
from utils.io import read_json_object

# The only classes (besides tensors and plain containers, which weights_only always allows) that a legacy
# file may ask for. argparse.Namespace is safe to rebuild: unpickling creates a bare object and fills its
# __dict__ with values that pass the same restricted unpickler; it has no __setstate__ or __init__ that could
# run anything. Classes such as a pickled model config are refused: allowing them would import their module.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]

ADAPTERHUB_CONFIG = "adapter_config.json"
ADAPTERHUB_WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")  # with / without use_safetensors
# Entries of an original checkpoint that are not delta modules, with what they hold (for the message).
NOT_DELTA_SECTIONS = {"model": "a whole fine-tuned model", "prompt": "a prompt-tuning vector",
                      "fastfood": "an intrinsic-dimension model"}
# Flags of the original trainer (and of tune.py) that size each method; prefix_num / prefix_r were older names.
ARG_ALIASES = {"prefix_num": "prefix_length", "prefix_r": "prefix_mlp"}
# Library config fields that do not change what a trained module computes (initialisation, training-time
# dropout, storage dtype). reduction_factor is checked through the weight shapes instead: the library floors
# d_model / factor, so different factors give the same width.
HUB_IGNORED_FIELDS = {"reduction_factor", "init_weights", "init_weights_seed", "dropout", "stochastic_depth", "dtype"}

_STORAGES = "|".join(sorted({re.escape(m.storage) for m in REGISTRY.values()}))
_HUB_NAME_RE = re.compile(rf"\.({_STORAGES})\.([^.]+)\.")
_ORIG_ADAPTER_RE = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.adapter\.adapter_([AB])(\.weight)?$")
_ORIG_LORA_RE = re.compile(
    r"^(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(SelfAttention|EncDecAttention)\.([qv])\.lora_([AB])$")
_ORIG_PREFIX_RE = re.compile(r"^(encoder|decoder)\.prefix\.(prefix|prefix_project\.\d+\.(weight|bias))$")
_BLOCK_RE = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.")


@dataclass
class LegacyCheckpoint:
    """What a legacy ``.pt`` holds: the delta tensors and whatever the original trainer saved with them."""

    tensors: dict[str, torch.Tensor]
    section: str | None  # 'adapter' / 'lora' / 'prefix', or None for a bare state dict
    args: dict[str, Any] = field(default_factory=dict)
    current_state: dict[str, Any] = field(default_factory=dict)


@dataclass
class Translated:
    """Tensors renamed to this project's delta names, with where they came from."""

    method: str
    tensors: dict[str, torch.Tensor]
    naming: str  # 'project' (this project's or AdapterHub's names) or 'original'
    dropped: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Safe loading


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` with ``SAFE_GLOBALS`` allowed for this call only.

    Anything else refused by the restricted unpickler, or a file torch cannot read, is a one-line
    UserInputError naming the file; nothing in a refused file is executed.
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: file not found")
    if not path.is_file():
        raise UserInputError(f"{path}: expected a torch checkpoint file, found a folder")
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive; its legacy format, a pickle
        raise UserInputError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise UserInputError(
                f"{path}: refused: unpickling it would import and call {found.group(1)}, which could run "
                "arbitrary code (only tensors, plain containers and argparse.Namespace are accepted; nothing "
                "from the file was run); if you trust the file, re-save just its tensor dicts where that "
                "code is importable, e.g. torch.save({'lora': ckpt['lora']}, 'clean.pt'), and use that"
            ) from None
        detail = next((ln.strip() for ln in str(e).splitlines()
                       if ln.strip() and not ln.startswith("Weights only load failed")), first_line(e))
        raise UserInputError(f"{path}: not a torch checkpoint that can be loaded safely ({detail[:200]})") from None
    except Exception as e:  # noqa: BLE001 - an untrusted file can fail inside torch in many ways
        raise UserInputError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {first_line(e)})") \
            from None


def read_foreign_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The tensor dict of another library's weights file: a ``.safetensors`` file, or a pickle read by
    ``safe_torch_load`` (so it runs nothing); anything else is one line naming the file."""
    if weights.suffix == ".safetensors":
        try:
            return load_file(str(weights))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UserInputError(f"{weights}: not a valid safetensors file ({first_line(e)})") from None
    raw = safe_torch_load(weights)
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise UserInputError(f"{weights}: expected a dict of tensors")
    return {str(k): v for k, v in raw.items()}


def _plain(value: Any) -> Any:
    """A JSON-able copy of a recorded flag value, or None when it is not a plain value."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return items if all(i is not None or v is None for i, v in zip(items, value)) else None
    return None


def read_legacy_pt(path: str | Path, tune_method: str | None = None) -> LegacyCheckpoint:
    """Read an original-code ``.pt`` (or a bare state dict saved with ``torch.save``) safely."""
    path = Path(path)
    obj = safe_torch_load(path)
    if not isinstance(obj, Mapping):
        raise UserInputError(f"{path}: expected a dict (a state dict, or one with an 'adapter', 'lora' or "
                             f"'prefix' entry), found {type(obj).__name__}")
    sections = [m for m in METHODS if isinstance(obj.get(m), Mapping)]
    args: dict[str, Any] = {}
    current: dict[str, Any] = {}
    if sections:
        if tune_method in sections:
            section = tune_method
        elif len(sections) > 1:
            raise UserInputError(f"{path}: holds several delta modules ({', '.join(sections)}); pick one with "
                                 "--tune_method")
        else:
            section = sections[0]
        raw = obj[section]
        recorded = obj.get("args")
        if isinstance(recorded, argparse.Namespace):
            recorded = vars(recorded)
        if isinstance(recorded, Mapping):  # keep the plain values (flags); drop anything else
            args = {str(k): _plain(v) for k, v in recorded.items() if v is None or _plain(v) is not None}
        if isinstance(obj.get("current_state"), Mapping):
            current = {str(k): _plain(v) for k, v in obj["current_state"].items()}
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        section, raw = None, obj
    else:
        held = [f"{k!r} ({what})" for k, what in NOT_DELTA_SECTIONS.items() if k in obj]
        if held:
            raise UserInputError(f"{path}: holds {', '.join(held)}, not a delta module (adapter, lora or prefix)")
        odd = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)][:3]
        raise UserInputError(f"{path}: expected a dict of tensors or an 'adapter'/'lora'/'prefix' entry; found "
                             f"non-tensor entries {odd}" if odd else f"{path}: holds no tensors")
    tensors: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        if not isinstance(v, torch.Tensor):
            raise UserInputError(f"{path}: entry {section or 'state dict'}[{k!r}] is a {type(v).__name__}, "
                                 "expected a tensor")
        tensors[str(k)] = v
    if not tensors:
        raise UserInputError(f"{path}: the {section or 'state dict'} entry holds no tensors")
    return LegacyCheckpoint(tensors, section, args, current)


# --------------------------------------------------------------------------------------------------
# Names


def parse_key_map(pairs: list[list[str]] | list[tuple[str, str]] | None) -> list[tuple[re.Pattern, str]]:
    """Compile ``--key_map REGEX REPLACEMENT`` rules (applied in order with ``re.sub``)."""
    rules = []
    for pattern, replacement in pairs or []:
        try:
            rules.append((re.compile(pattern), replacement))
        except re.error as e:
            raise UserInputError(f"--key_map: invalid regular expression {pattern!r} ({e})") from None
    return rules


def _strip_wrappers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a prefix that every key shares from a wrapper: ``module.`` (DataParallel) or ``transformer.``
    (AdapterHub's ``T5AdapterModel``, whose T5 sits under that name)."""
    for wrapper in ("module.", "transformer."):
        if tensors and all(k.startswith(wrapper) for k in tensors):
            tensors = {k[len(wrapper):]: v for k, v in tensors.items()}
    return tensors


def apply_key_map(tensors: dict[str, torch.Tensor], rules: list[tuple[re.Pattern, str]],
                  source: str) -> dict[str, torch.Tensor]:
    """Rename every key with the rules, after dropping a wrapper prefix (``_strip_wrappers``)."""
    tensors = _strip_wrappers(tensors)
    if not rules:
        return dict(tensors)
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        new = k
        for pattern, replacement in rules:
            try:
                new = pattern.sub(replacement, new)
            except (re.error, IndexError) as e:
                raise UserInputError(f"--key_map: replacement {replacement!r} fails on {k!r} ({e})") from None
        if new in out:
            raise UserInputError(f"{source}: --key_map maps two tensors to the same name {new!r}")
        out[new] = v
    return out


def _hub_renamed(tensors: dict[str, torch.Tensor], source: str) -> Translated:
    """This project's or AdapterHub's names under any module name -> the ``delta`` module's names."""
    names = sorted({m.group(2) for m in map(_HUB_NAME_RE.search, tensors) if m})
    if len(names) != 1:
        raise UserInputError(f"{source}: holds several modules ({', '.join(names)}); this project loads one")
    name = names[0]
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        m = _HUB_NAME_RE.search(k)
        out[f"{k[:m.start()]}.{m.group(1)}.{DELTA_NAME}.{k[m.end():]}"] = v
    spec = method_of(out, source)
    if spec.pool_home is None:
        return Translated(spec.name, out, "project")
    # A pool shared by every layer is listed under many paths in a full state dict; keep one under the name
    # this project uses, after checking the aliases agree.
    out = {}
    marker = f"{spec.storage}.{name}."
    for k, v in tensors.items():
        suffix = k.split(marker, 1)[1]
        canonical = f"{spec.pool_home}.{DELTA_NAME}.{suffix}"
        if canonical in out:
            if out[canonical].shape != v.shape or not torch.equal(out[canonical], v):
                raise UserInputError(f"{source}: two copies of {spec.name} parameter {suffix!r} differ")
            continue
        out[canonical] = v
    return Translated(spec.name, out, "project")


def _original_lora(tensors: dict[str, torch.Tensor], d_model: int, source: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        m = _ORIG_LORA_RE.match(k)
        modules.setdefault(k[: -len(".lora_A")], {})[m.group(6)] = v
    for base, pair in sorted(modules.items()):
        if set(pair) != {"A", "B"}:
            raise UserInputError(f"{source}: {base} has lora_{''.join(pair)} but not both lora_A and lora_B")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2:
            raise UserInputError(f"{source}: {base}.lora_A/lora_B must be matrices")
        original = a.shape[0] == d_model and a.shape[1] == b.shape[0]  # module/lora.py: (in, r) and (r, out)
        loralib = a.shape[1] == d_model and a.shape[0] == b.shape[1]  # loralib / AdapterHub: (r, in) and (out, r)
        if original == loralib:
            raise UserInputError(
                f"{source}: cannot tell the layout of {base}.lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                f"for d_model {d_model}")
        if original:
            a, b = a.t(), b.t()
        out[f"{base}.loras.{DELTA_NAME}.lora_A"] = a.contiguous()
        out[f"{base}.loras.{DELTA_NAME}.lora_B"] = b.contiguous()
    return out


def _original_adapter(tensors: dict[str, torch.Tensor], source: str,
                      drop_cross_adapters: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    groups: dict[tuple[str, int, int], dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        m = _ORIG_ADAPTER_RE.match(k)
        if v.dim() != 2:
            raise UserInputError(f"{source}: {k} must be a matrix, found shape {tuple(v.shape)}")
        # An nn.Parameter adapter_A is (d_model, size) (x @ A); the nn.Linear variant (``.weight``) stores it as
        # (size, d_model), the layout AdapterHub uses: keep every matrix in that layout.
        groups.setdefault((m.group(1), int(m.group(2)), int(m.group(3))), {})[m.group(4)] = (
            v if m.group(5) else v.t())
    ffn = {"encoder": 1, "decoder": 2}
    positions = {(stack, layer) for stack, _, layer in groups}
    unknown = sorted(p for p in positions if p[1] > ffn[p[0]])
    if unknown:
        raise UserInputError(f"{source}: adapter in {unknown[0][0]} sub-layer {unknown[0][1]}, which T5 does not have")
    if all(layer == ffn[stack] for stack, layer in positions):
        raise UserInputError(
            f"{source}: an original-code Pfeiffer adapter (after the FFN only) cannot be converted: AdapterHub's "
            "Pfeiffer adapter on T5 feeds the adapter the FFN output plus the residual stream, the original fed "
            "the FFN output alone, so the same weights would compute a different function")
    dropped = [f"decoder.block.{i}.layer.1.adapter" for stack, i, layer in sorted(groups)
               if stack == "decoder" and layer == 1]
    if dropped and not drop_cross_adapters:
        raise UserInputError(
            f"{source}: the original Houlsby adapter has {len(dropped)} decoder cross-attention adapters "
            "(decoder.block.N.layer.1.adapter) that this project's Houlsby adapter (AdapterHub DoubleSeqBn) does "
            "not have; pass --drop_cross_adapters to convert without them (the module then differs from the "
            "original)")
    out: dict[str, torch.Tensor] = {}
    for (stack, i, layer), pair in sorted(groups.items()):
        if stack == "decoder" and layer == 1:
            continue
        base = f"{stack}.block.{i}.layer.{layer}"
        if set(pair) != {"A", "B"}:
            raise UserInputError(f"{source}: {base}.adapter has adapter_{''.join(pair)} but not both A and B")
        down, up = pair["A"].contiguous(), pair["B"].contiguous()  # already in nn.Linear (out, in) layout
        if down.shape[0] != up.shape[1] or down.shape[1] != up.shape[0]:
            raise UserInputError(f"{source}: {base}.adapter: adapter_A and adapter_B shapes do not fit together")
        prefix = f"{base}.adapters.{DELTA_NAME}"
        out[f"{prefix}.adapter_down.0.weight"] = down
        out[f"{prefix}.adapter_down.0.bias"] = torch.zeros(down.shape[0], dtype=down.dtype)  # original: no bias
        out[f"{prefix}.adapter_up.weight"] = up
        out[f"{prefix}.adapter_up.bias"] = torch.zeros(up.shape[0], dtype=up.dtype)
    return out, dropped


def translate_names(tensors: dict[str, torch.Tensor], d_model: int, source: str, *,
                    drop_cross_adapters: bool = False) -> Translated:
    """Recognise the naming of a legacy state dict and rename (and re-lay) it to this project's delta names."""
    # Library names only where T5 has them: inside a block, or the model's prefix pool.
    hub = [k for k in tensors if _HUB_NAME_RE.search(k) and (_BLOCK_RE.match(k) or k.startswith("prefix_tuning."))]
    orig = {name: [k for k in tensors if rx.match(k)]
            for name, rx in (("adapter", _ORIG_ADAPTER_RE), ("lora", _ORIG_LORA_RE), ("prefix", _ORIG_PREFIX_RE))}
    matched = set(hub).union(*orig.values())
    unknown = sorted(set(tensors) - matched)
    if unknown:
        raise UserInputError(
            f"{source}: {len(unknown)} tensor names match neither this project's/AdapterHub's delta names nor the "
            f"original code's (e.g. {unknown[0]!r}); rename them with --key_map REGEX REPLACEMENT")
    kinds = (["project"] if hub else []) + [k for k, v in orig.items() if v]
    if len(kinds) != 1:
        raise UserInputError(f"{source}: mixes parameter namings ({', '.join(kinds)}); this project loads one module")
    if hub:
        return _hub_renamed(tensors, source)
    if orig["prefix"]:
        raise UserInputError(
            f"{source}: an original-code prefix module cannot be converted: it reshapes one projection into keys and "
            "values by a raw view, gives prefix positions T5's relative position bias and has no cross-attention "
            "prefix, none of which AdapterHub's prefix tuning can express")
    if orig["lora"]:
        return Translated("lora", _original_lora(tensors, d_model, source), "original")
    out, dropped = _original_adapter(tensors, source, drop_cross_adapters)
    return Translated("adapter", out, "original", dropped)


# --------------------------------------------------------------------------------------------------
# Sizes


def sizes_from_tensors(method: str, tensors: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """The sizes that the tensor shapes determine (LoRA's alpha is not among them)."""
    return REGISTRY[method].sizes_from_shapes({k: tuple(v.shape) for k, v in tensors.items()}, source)


def resolve_config(method: str, inferred: dict[str, Any], given: dict[str, Any], recorded: dict[str, Any],
                   source: str) -> DeltaConfig:
    """Method and sizes from the tensors, checked against flags (``given``) and the file's saved args.

    A flag or saved arg that contradicts the tensors is refused rather than silently ignored; a size the
    tensors do not determine (LoRA's alpha) comes from the flag, else from the saved args.
    """
    given = {k: v for k, v in given.items() if v is not None}
    if given.get("tune_method") not in (None, method):
        raise UserInputError(f"--tune_method {given['tune_method']} conflicts with {source}, which holds a {method} "
                             "module")
    saved = {ARG_ALIASES.get(k, k): v for k, v in recorded.items()}
    if saved.get("tune_method") in METHODS and saved["tune_method"] != method:
        raise UserInputError(f"{source}: its saved args say tune_method {saved['tune_method']} but it holds a "
                             f"{method} module")
    sizes = dict(inferred)
    for name in (f.name for f in REGISTRY[method].size_fields):
        flag = given.get(name)
        if name in inferred:
            if flag is not None and flag != inferred[name]:
                raise UserInputError(f"--{name} {flag} conflicts with {source}: its tensors have {name} "
                                     f"{inferred[name]}")
            if saved.get(name) is not None and saved[name] != inferred[name]:
                raise UserInputError(f"{source}: its saved args say {name} {saved[name]!r} but its tensors have "
                                     f"{name} {inferred[name]}")
            continue
        if flag is not None and saved.get(name) is not None and flag != saved[name]:
            raise UserInputError(f"--{name} {flag} conflicts with {source}, whose saved args say {name} "
                                 f"{saved[name]!r}")
        value = flag if flag is not None else saved.get(name)
        if value is None:
            raise UserInputError(f"{source}: {name} is not in its tensors or saved args; pass --{name}")
        sizes[name] = value
    try:
        return DeltaConfig.from_dict({"method": method, **sizes})
    except TypeError as e:
        raise UserInputError(f"{source}: sizes {sizes} do not form a delta config ({e})") from None


# --------------------------------------------------------------------------------------------------
# AdapterHub folders


def is_adapterhub_folder(path: str | Path) -> bool:
    """A ``save_adapter`` folder (and not one of this project's checkpoints)."""
    path = Path(path)
    return path.is_dir() and (path / ADAPTERHUB_CONFIG).is_file() and not (path / CONFIG_FILE).is_file()


def _hub_config_mismatch(cfg: DeltaConfig, theirs: dict[str, Any], d_model: int) -> str | None:
    """First field where the folder's library config differs from what this project builds, or None."""
    ours = library_config(cfg, d_model).to_dict()
    ignored = set(HUB_IGNORED_FIELDS)
    if not ours.get("phm_layer") and not theirs.get("phm_layer"):
        ignored |= {k for k in set(ours) | set(theirs) if k.startswith(("phm_", "hypercomplex_"))}
        ignored |= {"factorized_phm_W", "factorized_phm_rule", "learn_phm", "shared_W_phm", "shared_phm_rule"}
    for key in sorted((set(ours) | set(theirs)) - ignored):
        mine, other = ours.get(key), theirs.get(key)
        if isinstance(mine, tuple):
            mine = list(mine)
        if isinstance(other, tuple):
            other = list(other)
        if mine != other:
            return f"{key}={other!r} (this project's {cfg.describe()} has {key}={mine!r})"
    return None


def _hub_fingerprint(method: str, tensors: dict[str, torch.Tensor], d_model: int) -> dict[str, int]:
    """What the folder tells about its backbone: d_model and the layer counts (not the vocabulary)."""
    return {"d_model": d_model, **REGISTRY[method].layer_counts({k: tuple(v.shape) for k, v in tensors.items()},
                                                                  d_model)}


def read_adapterhub_folder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a ``save_adapter`` folder as this project's (tensors, meta); anything it cannot map is one line."""
    path = Path(path)
    cfg_file = path / ADAPTERHUB_CONFIG
    data = read_json_object(cfg_file)
    if "peft_type" in data:  # PEFT writes the same file name; models/formats/peft.py reads those folders
        raise UserInputError(f"{cfg_file}: a PEFT adapter (peft_type={data['peft_type']!r}), not an AdapterHub one")
    if not isinstance(data.get("config"), (dict, str)):
        raise UserInputError(f"{cfg_file}: expected an AdapterHub adapter config with a 'config' object")
    if data.get("model_type") not in (None, "t5"):
        raise UserInputError(f"{cfg_file}: made for a {data['model_type']!r} model; this project's backbone is T5")
    hidden = data.get("hidden_size")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0:
        raise UserInputError(f"{cfg_file}: expected a positive integer 'hidden_size', found {hidden!r}")
    theirs = data["config"]
    if isinstance(theirs, str):  # a named config, e.g. "seq_bn"
        from adapters import AdapterConfig

        try:
            theirs = AdapterConfig.load(theirs).to_dict()
        except (KeyError, ValueError, TypeError) as e:
            raise UserInputError(f"{cfg_file}: unknown adapter config {theirs!r} ({first_line(e)})") from None

    weights = next((path / f for f in ADAPTERHUB_WEIGHTS if (path / f).is_file()), None)
    if weights is None:
        raise UserInputError(f"{path}: AdapterHub folder without weights (expected {' or '.join(ADAPTERHUB_WEIGHTS)})")
    raw = _strip_wrappers(read_foreign_weights(weights))
    name = data.get("name")
    foreign = [k for k in raw if not (m := _HUB_NAME_RE.search(k)) or (name and m.group(2) != name)]
    if foreign:
        raise UserInputError(f"{weights}: {len(foreign)} tensors are not parameters of adapter {name!r} "
                             f"(e.g. {foreign[0]!r})")
    translated = _hub_renamed(raw, str(weights))
    method = translated.method
    architecture = theirs.get("architecture")
    spec = REGISTRY[method]
    if architecture not in spec.hub_architectures:
        raise UserInputError(f"{cfg_file}: architecture {architecture!r} does not match its {method} weights")
    sizes = sizes_from_tensors(method, translated.tensors, str(weights))
    if method == "adapter" and not theirs.get("mh_adapter") and sizes["adapter_type"] == "houlsby":
        raise UserInputError(f"{cfg_file}: mh_adapter is off but the weights have adapters after self-attention")
    extra_sizes = {f.name: theirs.get(f.hub_key) for f in spec.size_fields if f.hub_key}
    cfg = resolve_config(method, sizes, {}, extra_sizes, str(cfg_file))
    mismatch = _hub_config_mismatch(cfg, theirs, hidden)
    if mismatch:
        raise UserInputError(f"{cfg_file}: an AdapterHub module this project cannot load as is: {mismatch}")
    meta = {
        "format_version": FORMAT_VERSION,
        "method": cfg.method,
        "sizes": cfg.sizes(),
        "backbone": Path(str(data.get("model_name") or "unknown")).name,
        "backbone_fingerprint": _hub_fingerprint(method, translated.tensors, hidden),
        "task": None,
        "metric": None,
        "score": None,
        "step": None,
        "extra": {"converted_from": str(path), "source_format": "adapterhub", "adapter_name": name,
                  "adapters_version": data.get("version")},
    }
    return translated.tensors, meta


# --------------------------------------------------------------------------------------------------
# Conversion


@dataclass
class Conversion:
    """What ``convert_to_checkpoint`` wrote, for the command's summary line."""

    output: Path
    cfg: DeltaConfig
    source_format: str
    num_tensors: int
    dropped: list[str]


def _check_values(tensors: dict[str, torch.Tensor], source: str) -> None:
    for k, v in sorted(tensors.items()):
        if not v.is_floating_point():
            raise UserInputError(f"{source}: {k} has dtype {v.dtype}; delta weights are floating point")
        if not bool(torch.isfinite(v).all()):
            raise UserInputError(f"{source}: {k} holds NaN or infinite values")


# Long by design: one conversion, read top to bottom (find the format, map every name, check shapes, write);
# its steps share the names and shapes they build up.
def convert_to_checkpoint(
    source: str | Path,
    output: str | Path,
    *,
    model: str | Path,
    tokenizer_path: str | Path | None = None,
    given: dict[str, Any] | None = None,
    key_map: list[list[str]] | list[tuple[str, str]] | None = None,
    drop_cross_adapters: bool = False,
    task: str | None = None,
    overwrite: bool = False,
    read_folder: Any = None,
    allow_other_backbone: bool = False,
) -> Conversion:
    """Convert a legacy ``.pt`` or an adapter folder into a checkpoint folder of this project.

    A folder is read by ``read_folder`` (path -> (tensors, meta); the checkpoint-format registry's reader, which
    knows PEFT folders too) or, when not given, as an AdapterHub ``save_adapter`` folder.

    The module is attached to the backbone ``model`` and its tensors loaded there (keys and shapes must
    match exactly) before anything is written; the checkpoint records that backbone's fingerprint.
    ``given`` holds the size flags (None = not given), checked against what the file determines.
    """
    from models.backbone import backbone_name, load_backbone
    from models.delta import (
        attach_delta,
        backbone_fingerprint,
        check_compatible,
        delta_state_dict,
        load_delta_state,
        save_delta_checkpoint,
    )

    source, output = Path(source), Path(output)
    given = dict(given or {})
    rules = parse_key_map(key_map)
    if output.exists():
        if not output.is_dir():
            raise UserInputError(f"{output}: exists and is a file; expected a new checkpoint folder")
        if not overwrite:
            raise UserInputError(f"{output}: exists; pass --overwrite to replace it")
    if not source.exists():
        raise UserInputError(f"{source}: not found")
    if output.resolve() == source.resolve():
        raise UserInputError(f"{output}: the output folder must differ from the source")

    ckpt: LegacyCheckpoint | None = None
    if source.is_dir():
        if (source / CONFIG_FILE).is_file():
            raise UserInputError(f"{source}: already a checkpoint of this project; nothing to convert")
        if not is_adapterhub_folder(source):  # PEFT writes the same config file name
            raise UserInputError(f"{source}: a folder without {ADAPTERHUB_CONFIG}; expected a legacy .pt file, an "
                                 "AdapterHub save_adapter folder or a PEFT adapter folder")
        if rules:
            raise UserInputError("--key_map applies to .pt files; adapter folders use their library's names")
        tensors, hub_meta = (read_folder or read_adapterhub_folder)(source)
        source_format = hub_meta["extra"]["source_format"]
    else:
        ckpt = read_legacy_pt(source, given.get("tune_method"))
        tensors = apply_key_map(ckpt.tensors, rules, str(source))

    net, _ = load_backbone(model, tokenizer_path, "cpu")
    fingerprint = backbone_fingerprint(net)
    dropped: list[str] = []
    if ckpt is None:
        hub_cfg = DeltaConfig.from_checkpoint_meta(hub_meta)
        every_size = {f.name: hub_cfg.values[f.name] for f in hub_cfg.spec.size_fields}  # sizes() omits earlier ones
        cfg = resolve_config(hub_cfg.method, every_size, given, {}, str(source))
        check_compatible(hub_meta, cfg, fingerprint, str(source), allow_other_weights=allow_other_backbone,
                         backbone=str(model))
    else:
        translated = translate_names(tensors, fingerprint["d_model"], str(source),
                                     drop_cross_adapters=drop_cross_adapters)
        tensors, dropped = translated.tensors, translated.dropped
        source_format = f"{translated.naming} names in a .pt"
        inferred = sizes_from_tensors(translated.method, tensors, str(source))
        cfg = resolve_config(translated.method, inferred, given, ckpt.args, str(source))
    _check_values(tensors, str(source))
    attach_delta(net, cfg)
    load_delta_state(net, tensors, str(source))  # every key and shape must match the backbone's module

    extra: dict[str, Any] = {"converted_from": str(source.resolve()), "source_format": source_format}
    step = None
    if ckpt is not None:
        extra["args"] = ckpt.args
        if ckpt.current_state:
            extra["current_state"] = ckpt.current_state
        if isinstance(ckpt.current_state.get("num_updates"), int):
            step = ckpt.current_state["num_updates"]
    if dropped:
        extra["dropped"] = dropped
    save_delta_checkpoint(output, delta_state_dict(net), cfg, backbone_name(model), fingerprint, task=task,
                          step=step, extra=extra)
    return Conversion(output, cfg, source_format, len(tensors), dropped)
