"""Write any LoRA checkpoint this project reads as a PEFT adapter folder (``adapter_config.json`` and
``adapter_model.safetensors``), which ``PeftModel.from_pretrained(base, folder)`` loads.

Only LoRA maps: PEFT's T5 prefix tuning reaches only the decoder's self-attention and is wrong under
``generate()``, so a prefix module is refused with that reason; bottleneck adapters and (IA)³ have no PEFT
counterpart that computes the same thing.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from models.delta import DeltaConfig
from models.formats import load_delta_checkpoint
from models.formats.peft import PEFT_CONFIG, PEFT_WEIGHTS, is_peft_folder, peft_config_for, peft_state
from utils.errors import UserInputError
from utils.io import staged_dir, with_umask_mode

REFUSED = {
    "prefix": "PEFT's T5 prefix tuning reaches only the decoder's self-attention and is wrong under generate(), "
              "so a PEFT copy would not compute what this module computes",
    "adapter": "PEFT has no bottleneck adapter that computes what this project's (AdapterHub's) adapter computes",
    "ia3": "PEFT's IA³ scales other activations than this project's (IA)³",
}


def check_exportable(method: str, flag: str = "--export_peft") -> None:
    """Refuse, before any work, a method that has no PEFT counterpart."""
    if method != "lora":
        raise UserInputError(f"{flag}: {method} modules cannot be written as PEFT adapters: "
                             f"{REFUSED.get(method, 'only LoRA modules map onto PEFT')}")


def check_destination(out_dir: Path, overwrite: bool, flag: str) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not is_peft_folder(out_dir))):
        raise UserInputError(f"{flag} {out_dir}: exists and is not a PEFT adapter folder; not replacing it")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserInputError(f"{flag} {out_dir}: a PEFT adapter folder exists there; pass --overwrite to replace it")


def export_peft(checkpoint: str | Path, out_dir: str | Path, *, base_model: str | None = None,
                overwrite: bool = False, flag: str = "OUT_DIR") -> Path:
    """Write checkpoint folder ``checkpoint`` (any format this project reads) as a PEFT LoRA folder, atomically.

    ``base_model`` goes into ``base_model_name_or_path`` (default: the backbone the checkpoint records)."""
    out_dir = Path(out_dir)
    tensors, meta = load_delta_checkpoint(checkpoint)
    check_exportable(str(meta.get("method")), flag)
    check_destination(out_dir, overwrite, flag)
    cfg = DeltaConfig.from_checkpoint_meta(meta)
    config = peft_config_for(cfg, base_model or str(meta.get("backbone") or "unknown"), tensors)
    with staged_dir(out_dir) as tmp:
        save_file(peft_state(tensors), str(tmp / PEFT_WEIGHTS[0]), metadata={"format": "pt"})
        with_umask_mode(tmp / PEFT_WEIGHTS[0])  # safetensors writes 0600 whatever the umask
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir
