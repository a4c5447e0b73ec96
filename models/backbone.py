"""Loading a frozen backbone of any registered family (models/backbones/) and its tokenizer, from a local folder
or a Hugging Face hub id."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from models.backbones import BackboneFamily, family_for_type
from utils.errors import UserInputError, first_line
from utils.threads import limit_torch_threads

TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def pick_device(name: str) -> str:
    """``auto`` means cuda when present; anything else is passed to torch as given."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def looks_like_path(arg: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything path-shaped must exist locally instead."""
    if arg.startswith(("./", "../", "/", "~", ".\\")) or arg in (".", ".."):
        return True
    parent = Path(arg).expanduser().parent
    return str(parent) not in ("", ".") and parent.is_dir()


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE") for k in (
        "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def backbone_name(model_arg: str | Path) -> str:
    """Short name of the backbone for checkpoint metadata: folder name or hub id basename."""
    text = str(model_arg).rstrip("/\\")
    name = Path(text).name
    if not name or name in (".", ".."):
        name = Path(text).expanduser().resolve().name
    return name or text


def checked_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device this machine has; anything else is one line naming --device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UserInputError(
            f"--device: expected cpu, cuda or cuda:N, found {device!r} ({first_line(e)})"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"--device: {device!r} requested but CUDA is not available on this machine")
    return dev


def load_backbone(
    model: str | Path,
    tokenizer_path: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load the backbone + tokenizer; the model is in eval mode with every parameter frozen.

    ``model`` is a local folder (``save_pretrained`` layout) or a hub id. Problems the user can fix (a
    missing folder, a hub id that is not cached while offline, no tokenizer files) become one-line
    UserInputErrors instead of library tracebacks. Every stage loads its backbone here, so this is also where
    torch's threads are capped at the cores the process may use (``utils.threads``).
    """
    limit_torch_threads()
    dev = checked_device(device)
    arg = str(model)
    local = Path(arg).expanduser()
    if local.exists():
        if not local.is_dir():
            raise UserInputError(f"--model {arg}: expected a model folder (with config.json), found a file")
        if not (local / "config.json").is_file():
            raise UserInputError(f"--model {arg}: expected a model folder with config.json, found none")
        source: str = str(local)
    elif looks_like_path(arg):
        raise UserInputError(f"--model {arg}: folder not found")
    else:
        source = arg

    family = check_architecture(source, arg)
    try:
        family = family or hub_family(source, arg)
        net = family.model_class().from_pretrained(source)
    except (OSError, ValueError) as e:
        if source is arg and _offline():
            raise UserInputError(
                f"--model {arg}: not a local folder and not in the Hugging Face cache (offline mode is on); "
                "pass a local model folder"
            ) from None
        raise UserInputError(f"--model {arg}: could not load the model ({first_line(e)})") from None

    flag = "--tokenizer_path" if tokenizer_path is not None else "--model"
    tok_arg = str(tokenizer_path) if tokenizer_path is not None else source
    tok_local = Path(tok_arg).expanduser()
    if tok_local.is_dir():
        # Without these files transformers tries to convert a slow tokenizer and fails deep inside
        # (protobuf/sentencepiece import errors), so say what is missing up front.
        if not any((tok_local / f).is_file() for f in TOKENIZER_FILES):
            expected = " or ".join(TOKENIZER_FILES)
            raise UserInputError(f"{flag} {tok_arg}: no tokenizer files (expected {expected})")
        tok_arg = str(tok_local)
    elif tok_local.exists():
        raise UserInputError(f"{flag} {tok_arg}: expected a tokenizer folder, found a file")
    elif looks_like_path(tok_arg):
        raise UserInputError(f"{flag} {tok_arg}: folder not found")
    try:
        # config= lets a bare tokenizer.json (no tokenizer_config.json) resolve to the model's tokenizer class.
        tokenizer = AutoTokenizer.from_pretrained(tok_arg, config=net.config)
        family.prepare_tokenizer(tokenizer)
    except (OSError, ValueError, TypeError, ImportError) as e:
        raise UserInputError(f"{flag} {tok_arg}: could not load a tokenizer ({first_line(e)})") from None

    check_vocabulary(net, tokenizer, flag, tok_arg)
    net.to(dev)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, tokenizer


def check_architecture(source: str, arg: str) -> BackboneFamily | None:
    """The family of a local model folder; another architecture (GPT-2, BERT, ...) is refused by name before
    loading, which would fail deep inside transformers or AdapterHub. None for a hub id (read when loaded)."""
    config_file = Path(source) / "config.json"
    if not config_file.is_file():
        return None  # a hub id: transformers reads its config
    from utils.io import read_json_object

    return family_for_type(read_json_object(config_file).get("model_type"), f"--model {arg} ({config_file})")


def hub_family(source: str, arg: str) -> BackboneFamily:
    """The family of a hub model, from the config transformers reads for it."""
    from transformers import AutoConfig

    return family_for_type(getattr(AutoConfig.from_pretrained(source), "model_type", None), f"--model {arg}")


# Models pad their embedding matrix past the tokenizer's vocabulary (T5: 32128 rows for 32100 tokens; Llama 3:
# 256 reserved rows); more than this many unused rows means the tokenizer belongs to another model.
VOCAB_SLACK = 512


def check_vocabulary(net, tokenizer, flag: str, tok_arg: str) -> None:
    """The tokenizer must belong to the model: every id it makes must index the embedding matrix (else an
    IndexError mid-run), and a vocabulary far smaller than the matrix means ids that mean other tokens."""
    rows = net.get_input_embeddings().num_embeddings
    # Every id of the base vocabulary must index a row (T5's sentinels, added on top, may lie past the rows of a
    # tiny model); with its added tokens the tokenizer must come close to the rows (Llama's reserved tokens).
    size = tokenizer.vocab_size
    if size > rows or len(tokenizer) < rows - VOCAB_SLACK:
        raise UserInputError(f"{flag} {tok_arg}: a tokenizer of {len(tokenizer)} tokens ({size} in its base "
                             f"vocabulary) for a model with {rows} embedding rows; the tokenizer and the model do not "
                             "belong together (pass the model's own tokenizer)")


def load_backbone_config(model: str | Path):
    """The backbone's config alone (no weights): what sizing decisions need before the model is loaded."""
    from transformers import AutoConfig

    arg = str(model)
    local = Path(arg).expanduser()
    try:
        return AutoConfig.from_pretrained(str(local) if local.exists() else arg)
    except (OSError, ValueError) as e:
        raise UserInputError(f"--model {arg}: could not read the model's config ({first_line(e)})") from None


def quiet_libraries() -> None:
    """Silence library warnings (deprecations, cache-format notices) for tidy script output (--quiet)."""
    import logging
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    logging.getLogger("adapters").setLevel(logging.ERROR)


