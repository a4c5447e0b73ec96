"""Loading the frozen T5 backbone and its tokenizer (local folder or Hugging Face hub id)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5ForConditionalGeneration

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
) -> tuple[T5ForConditionalGeneration, PreTrainedTokenizerBase]:
    """Load T5 + tokenizer; the model is in eval mode with every parameter frozen.

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

    check_architecture(source, arg)
    try:
        net = T5ForConditionalGeneration.from_pretrained(source)
    except (OSError, ValueError) as e:
        if source is arg and _offline():
            raise UserInputError(
                f"--model {arg}: not a local folder and not in the Hugging Face cache (offline mode is on); "
                "pass a local model folder"
            ) from None
        raise UserInputError(f"--model {arg}: could not load a T5 model ({first_line(e)})") from None

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
        # config= lets a bare tokenizer.json (no tokenizer_config.json) resolve to T5's tokenizer class.
        tokenizer = AutoTokenizer.from_pretrained(tok_arg, config=net.config)
    except (OSError, ValueError, TypeError, ImportError) as e:
        raise UserInputError(f"{flag} {tok_arg}: could not load a tokenizer ({first_line(e)})") from None

    check_vocabulary(net, tokenizer, flag, tok_arg)
    net.to(dev)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, tokenizer


SUPPORTED_MODEL_TYPES = ("t5", "mt5")  # T5ForConditionalGeneration loads these (Flan-T5 and T5 v1.1 are "t5")


def check_architecture(source: str, arg: str) -> None:
    """A local model folder of another architecture (GPT-2, BERT, ...) is refused by name before loading: loading
    it as T5 would fail deep inside transformers or AdapterHub."""
    config_file = Path(source) / "config.json"
    if not config_file.is_file():
        return  # a hub id: transformers reads its config
    from utils.io import read_json_object

    model_type = read_json_object(config_file).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserInputError(f"--model {arg}: a {model_type or 'model of unknown type'} model ({config_file}: "
                             f"model_type {model_type!r}); supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


# T5 pads its embedding matrix past the tokenizer's base vocabulary (32128 rows for 32000 pieces and 100 sentinels);
# more than this many unused rows means the tokenizer belongs to another model.
VOCAB_SLACK = 256


def check_vocabulary(net, tokenizer, flag: str, tok_arg: str) -> None:
    """The tokenizer must belong to the model: every id it makes must index the embedding matrix (else an
    IndexError mid-run), and a vocabulary far smaller than the matrix means ids that mean other tokens."""
    rows = net.get_input_embeddings().num_embeddings
    size = tokenizer.vocab_size  # the base vocabulary: added special tokens (T5's sentinels) may lie past it
    if size > rows or size < rows - VOCAB_SLACK:
        raise UserInputError(f"{flag} {tok_arg}: a tokenizer of {size} tokens for a model with {rows} embedding "
                             "rows; the tokenizer and the model do not belong together (pass the model's own "
                             "tokenizer)")


def load_backbone_config(model: str | Path):
    """The backbone's T5Config alone (no weights): what sizing decisions need before the model is loaded."""
    from transformers import T5Config

    arg = str(model)
    local = Path(arg).expanduser()
    try:
        return T5Config.from_pretrained(str(local) if local.exists() else arg)
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


