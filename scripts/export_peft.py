"""Write a LoRA checkpoint as a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

CHECKPOINT is any LoRA module this project reads (its own checkpoint folder, a run or task folder of tune.py, an
AdapterHub or PEFT folder). The PEFT folder loads with ``PeftModel.from_pretrained(base_model, OUT_DIR)`` and
gives the same logits. Prefix tuning, bottleneck adapters and (IA)³ are refused with the reason.

    .venv/bin/python scripts/export_peft.py runs/fused/lora/Loss/without_sent_review runs/peft/sent_review
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.errors import run_cli  # noqa: E402
from utils.params import HelpFormatter  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="LoRA checkpoint folder (or a tune.py run or task folder)")
    p.add_argument("out_dir", help="PEFT adapter folder to write (must be new, unless --overwrite)")
    p.add_argument("--base_model", default=None,
                   help="base_model_name_or_path to record (default: the backbone the checkpoint names)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is a PEFT adapter folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before the heavy imports: --help answers at once
    from models.formats.peft_export import export_peft
    from models.run_folders import resolve_checkpoint
    from utils.io import check_output_folder

    check_output_folder(args.out_dir, "OUT_DIR", {"CHECKPOINT": args.checkpoint})
    out = export_peft(resolve_checkpoint(args.checkpoint), args.out_dir, base_model=args.base_model,
                      overwrite=args.overwrite)
    print(f"wrote PEFT adapter {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
