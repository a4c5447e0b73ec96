"""Convert a delta module saved elsewhere into a checkpoint folder of this project.

SOURCE is either a ``.pt`` file of the original research code (``{'adapter'|'lora'|'prefix': state dict,
'args', 'current_state'}``) or a bare state dict saved with ``torch.save``, or an AdapterHub
``save_adapter`` folder, or a PEFT LoRA folder (models/formats/peft.py). The file is read with
``torch.load(weights_only=True)`` (argparse.Namespace allowed) or safetensors: a pickle that would import
and call anything else is refused and nothing in it runs. Method and sizes are read from the tensor names
and shapes (LoRA's alpha from ``--lora_alpha`` or the file's saved args); size flags, when given, must
agree. The module is then attached to the backbone (``--model``) and its tensors loaded there, so a key or
shape that does not fit stops the conversion before OUTPUT is written; OUTPUT records that backbone's
fingerprint and loads with ``tune.py --train_checkpoint OUTPUT``.

Names: this project's and AdapterHub's (``...loras.<any name>.lora_A`` etc.) and the original code's
(``...SelfAttention.q.lora_A``, ``...layer.0.adapter.adapter_A``) are recognised; anything else can be
renamed first with ``--key_map REGEX REPLACEMENT`` (repeatable, applied in order with Python's re.sub),
e.g. ``--key_map '^t5\\.' ''``. Original LoRA modules convert exactly; original Houlsby adapters only with
``--drop_cross_adapters`` (this project's Houlsby adapter has none after cross-attention); original
Pfeiffer adapters and prefixes compute something AdapterHub cannot express and are refused (see
models/legacy.py).

    .venv/bin/python scripts/convert_legacy_ckpt.py old/checkpoint-best.pt runs/converted/sent_review \\
        --lora_alpha 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.methods import METHODS, SIZE_FLAGS, add_size_flags  # noqa: E402
from models.settings import DEFAULT_MODEL_DIR  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.params import HelpFormatter  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("source", help="legacy .pt file, AdapterHub save_adapter folder or PEFT adapter folder")
    p.add_argument("output", help="checkpoint folder to write (must not exist, unless --overwrite)")
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="backbone to check against (default: embedded)")
    p.add_argument("--tokenizer_path", default=None, help="tokenizer folder (default: --model)")
    sizes = p.add_argument_group("method and sizes (default: read from the file; given ones must agree)")
    sizes.add_argument("--tune_method", choices=METHODS, default=None,
                       help="also picks the module of a file that holds several")
    add_size_flags(sizes)  # LoRA's --lora_alpha is needed when the file has no saved args
    p.add_argument("--key_map", nargs=2, action="append", metavar=("REGEX", "REPLACEMENT"), default=None,
                   help="rename tensors before recognising them (repeatable, applied in order)")
    p.add_argument("--drop_cross_adapters", action="store_true",
                   help="convert an original Houlsby adapter without its decoder cross-attention adapters")
    p.add_argument("--task", default=None, help="task name to record in the checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it is a checkpoint folder")
    p.add_argument("--allow_other_backbone", action="store_true",
                   help="accept a PEFT adapter whose base_model_name_or_path names another model than --model")
    p.add_argument("--quiet", action="store_true", help="silence library warnings")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before the heavy imports: --help answers at once
    from models.backbone import quiet_libraries
    from models.formats import read_checkpoint_folder
    from models.legacy import convert_to_checkpoint
    from utils.io import check_output_folder

    check_output_folder(args.output, "OUTPUT", {"SOURCE": args.source, "--model": args.model,
                                                "--tokenizer_path": args.tokenizer_path})
    if args.quiet:
        quiet_libraries()
    given = {k: getattr(args, k) for k in ("tune_method", *SIZE_FLAGS)}
    done = convert_to_checkpoint(args.source, args.output, model=args.model, tokenizer_path=args.tokenizer_path,
                                 given=given, key_map=args.key_map, drop_cross_adapters=args.drop_cross_adapters,
                                 task=args.task, overwrite=args.overwrite, read_folder=read_checkpoint_folder,
                                 allow_other_backbone=args.allow_other_backbone)
    if done.dropped:
        print(f"warning: dropped {len(done.dropped)} decoder cross-attention adapters "
              f"({done.dropped[0]}, ...); the converted module differs from the original", file=sys.stderr)
    print(f"converted {args.source} ({done.source_format}, {done.num_tensors} tensors): {done.cfg.describe()} "
          f"-> {done.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
